"""`dream-fast demo`: the whole of DREAM on a CPU in minutes, with no downloads.

Writes the shapes shards, trains the tiny preset within a time budget (the Masking Warmup and lr
schedules are sized to what the machine can do in that budget), exports the EMA weights, evaluates
the encoder (linear probe, zero-shot) and the generator (attribute oracle on seen and held-out
combinations, K = 1 vs SAD), and writes report.md, captioned grids, a loss plot and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dream_fast.config import DreamConfig, load_config
from dream_fast.model.masking import num_masked, random_orders, sample_mask_ratio

log = logging.getLogger("dream_fast.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes (default 10)")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--config", default=None, help="YAML config (default: the `tiny` preset)")
    p.add_argument("--prompts", type=int, default=200, help="evaluation prompts per split (seen, held-out)")
    p.add_argument("--candidates", type=int, default=5, help="SAD candidates K (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--skip-eval", action="store_true", help="train and export only")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=32")


# --------------------------------------------------------------------------------------------
# budget planning
# --------------------------------------------------------------------------------------------


def _step_seconds(cfg: DreamConfig, ratios: list[float], precision: str, reps: int = 3) -> list[float]:
    """Seconds per training step (fwd + bwd + AdamW) of a fresh model at a few mask ratios.

    The fastest of `reps` timings: another process busy for a moment only slows some of them (a
    median of two once read 2.9 s for a 0.66 s step and sized the schedule to half the budget)."""
    from dream_fast.model.dream import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss).train()
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-5)
    B, L, m = cfg.train.batch_size, cfg.model.seq_len, cfg.model
    tokens = torch.randn(B, L, m.token_dim)
    ids = torch.full((B, m.text_context), 2, dtype=torch.long)
    ids[:, 0] = 1
    emb = torch.randn(B, m.text_cond_len, m.text_cond_dim)
    mask = torch.ones(B, m.text_cond_len, dtype=torch.bool)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    out = []
    for r in ratios:
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            with amp:
                loss = model(tokens, ids, num_masked(r, L), random_orders(B, L), emb, mask)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:  # the first step warms allocator and caches
                times.append(time.perf_counter() - t0)
        out.append(min(times))
    return out


def plan_epochs(cfg: DreamConfig, minutes: float, num_train: int, safety: float = 0.85) -> dict[str, Any]:
    """How many epochs fit in `minutes`: the step cost depends on the mask ratio (the decoder and head
    only run on micro-batches masked >= 50%), so average a measured cost model over the schedule."""
    from dream_fast.train.engine import resolve_precision

    ratios = [0.3, 0.6, 0.95]
    precision = resolve_precision(cfg, torch.device("cpu"))
    t_low, t_mid, t_high = _step_seconds(cfg, ratios, precision)
    L = cfg.model.seq_len

    def step_time(r: float) -> float:
        if num_masked(r, L) / L < cfg.loss.diff_threshold:
            return t_low
        return t_mid + (t_high - t_mid) * (r - 0.6) / 0.35

    rng = np.random.default_rng(0)

    def mean_step(epoch: float) -> float:
        return float(np.mean([step_time(sample_mask_ratio(cfg.mask, epoch, rng)) for _ in range(400)]))

    # the schedule is expressed in the preset's epochs; rescale it to the epochs we can afford
    base_epochs = cfg.train.epochs
    grid = np.linspace(0, base_epochs, 9)
    avg = float(np.mean([mean_step(e) for e in grid]))
    steps = minutes * 60.0 * safety / avg
    epochs = steps * cfg.train.batch_size / num_train
    return {"epochs": epochs, "scale": epochs / base_epochs, "sec_per_step": avg,
            "samples_per_sec": cfg.train.batch_size / avg, "precision": precision,
            "step_seconds_at": dict(zip(ratios, [t_low, t_mid, t_high]))}


def apply_plan(cfg: DreamConfig, plan: dict[str, Any], num_train: int) -> None:
    """Shrink every epoch-denominated schedule by the same factor; keep the EMA horizon (1/(1-decay)
    steps) within a tenth of the run, or the EMA weights would still remember the initialisation."""
    s = plan["scale"]
    cfg.train.epochs = plan["epochs"]
    cfg.mask.warmup_start_epoch *= s
    cfg.mask.warmup_end_epoch *= s
    cfg.optim.warmup_epochs *= s
    steps = max(plan["epochs"] * num_train / cfg.train.batch_size, 100.0)
    cfg.optim.ema_decay = min(cfg.optim.ema_decay, 1.0 - 10.0 / steps)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def evaluate_generation(pipe, n: int, K: int, threshold: int | None, seed: int = 0,
                        batch_size: int = 32) -> dict[str, Any]:
    """Oracle accuracy of generated images on seen (val) and held-out prompts."""
    from dream_fast.eval import oracle_accuracy, shapes_eval_prompts

    out: dict[str, Any] = {}
    images_by_split = {}
    for split in ("val", "heldout"):
        pairs = shapes_eval_prompts(n, split=split, seed=1234 + (split == "heldout"))
        prompts, metas = [p for p, _ in pairs], [m for _, m in pairs]
        t0 = time.perf_counter()
        res = pipe(prompts, num_candidates=K, threshold=threshold, seed=seed, batch_size=batch_size,
                   progress=True)
        elapsed = time.perf_counter() - t0
        rep = oracle_accuracy(res.images, metas)
        out[split] = {"oracle": rep, "seconds": elapsed, "images_per_sec": n / elapsed}
        images_by_split[split] = (res.images, prompts, metas, res)
    return {"metrics": out, "images": images_by_split}


def evaluate_encoder(bundle_dir: Path, data_dir: Path, n_train: int = 5000, n_val: int = 1000) -> dict[str, Any]:
    """Linear probes (shape, colour, position) and zero-shot shape classification."""
    from dream_fast.data import shard_pattern
    from dream_fast.eval import EvalImages, linear_probe, shapes_class_prompts, zero_shot_classify
    from dream_fast.pretrained import load_pretrained

    pre = load_pretrained(bundle_dir)
    size = pre.cfg.model.img_size
    res: dict[str, Any] = {}
    for key in ("shape_id", "colour_id", "position_id"):
        tr = EvalImages(shard_pattern(data_dir, "train"), size, label_key=key, max_samples=n_train)
        va = EvalImages(shard_pattern(data_dir, "val"), size, label_key=key, max_samples=n_val)
        r = linear_probe(pre.model, tr, va, label_key=key, epochs=90)
        res[f"probe_{key[:-3]}"] = r["top1"]
    names, prompts = shapes_class_prompts("shape_id", per_class=32)
    va = EvalImages(shard_pattern(data_dir, "val"), size, label_key="shape_id", max_samples=n_val)
    zs = zero_shot_classify(pre.model, pre.tokenizer, va, prompts, label_key="shape_id", class_names=names)
    res["zeroshot_shape"] = zs["top1"]
    return res


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report(out: Path, metrics: dict[str, Any]) -> Path:
    lines = ["# dream_fast demo report", ""]
    tr = metrics.get("train", {})
    lines += [
        "## Training",
        f"- preset `{metrics.get('preset', 'tiny')}`, {metrics.get('params_m', 0):.2f} M parameters, "
        f"{tr.get('steps', '?')} steps, {tr.get('epochs', 0):.2f} epochs, "
        f"{tr.get('minutes', 0):.1f} min, ~{tr.get('samples_per_sec', 0):.0f} samples/s",
        f"- final losses: diffusion {tr.get('loss_diff', float('nan')):.4f}, "
        f"contrastive {tr.get('loss_clip', float('nan')):.4f}",
        "- loss curves: `loss_curves.png`", "",
    ]
    enc = metrics.get("encoder")
    if enc:
        lines += ["## Encoder", "| linear probe shape | colour | position | zero-shot shape |", "|---|---|---|---|",
                  f"| {_fmt(enc['probe_shape'])} | {_fmt(enc['probe_colour'])} | {_fmt(enc['probe_position'])} "
                  f"| {_fmt(enc['zeroshot_shape'])} |", ""]
    gen = metrics.get("generation")
    if gen:
        lines += ["## Generation (attribute oracle; 95% Wilson intervals on all-attributes)", "",
                  "| sampler | split | colour | position | shape | size | all | all 95% CI | images/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, res in gen.items():
            for split, r in res.items():
                acc = r["oracle"]
                ci = acc.get("all_ci95", [float("nan")] * 2)
                lines.append(f"| {name} | {split} | {_fmt(acc['colour'])} | {_fmt(acc['position'])} | "
                             f"{_fmt(acc['shape'])} | {_fmt(acc['size'])} | {_fmt(acc['all'])} | "
                             f"[{_fmt(ci[0])}, {_fmt(ci[1])}] | {r['images_per_sec']:.1f} |")
        lines += ["", "Grids: `samples_k1.png` (K = 1) and `samples_sad.png` (SAD), seen prompts.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_config(args: argparse.Namespace) -> DreamConfig:
    cfg = load_config(args.config, args.overrides) if args.config else load_config(None, args.overrides, "tiny")
    out = Path(args.out)
    cfg.train.out_dir = str(out / "run")
    cfg.data.shapes_dir = str(out / "data")
    cfg.train.resume = "auto"
    return cfg.validate()


def main(args: argparse.Namespace) -> int:
    from dream_fast.data import caption_grid, write_shapes_shards
    from dream_fast.model import build_model, count_params
    from dream_fast.train import export_checkpoint, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = build_config(args)
    t_start = time.perf_counter()

    d = cfg.data
    write_shapes_shards(d.shapes_dir, d.shapes_num_train, d.shapes_num_val, d.shapes_num_val, seed=d.shapes_seed,
                        img_size=cfg.model.img_size)

    plan_path = out / "plan.json"
    if plan_path.exists():  # a re-run resumes the same schedule
        plan = json.loads(plan_path.read_text())
    else:
        print(f"measuring training speed to size the schedule to {args.minutes:g} minutes ...", flush=True)
        plan = plan_epochs(cfg, args.minutes, d.shapes_num_train)
        plan["minutes"] = args.minutes
        plan_path.write_text(json.dumps(plan, indent=2))
    apply_plan(cfg, plan, d.shapes_num_train)
    cfg.train.max_minutes = plan["minutes"]
    print(f"plan: {plan['epochs']:.2f} epochs at ~{plan['samples_per_sec']:.0f} samples/s "
          f"({plan.get('precision', cfg.train.precision)}) "
          f"(Masking Warmup to epoch {cfg.mask.warmup_end_epoch:.2f})", flush=True)

    result = train(cfg, progress=True)
    bundle = out / "model"
    export_checkpoint(result.out_dir, bundle)
    metrics: dict[str, Any] = {"preset": cfg.name, "plan": plan,
                               "params_m": count_params(build_model(cfg.model, device="meta")) / 1e6}
    metrics["train"] = _train_summary(result, cfg)
    _plot(result.out_dir, out / "loss_curves.png")

    if not args.skip_eval:
        from dream_fast.sampling import DreamPipeline

        print("evaluating the encoder (linear probes, zero-shot) ...", flush=True)
        metrics["encoder"] = evaluate_encoder(bundle, Path(d.shapes_dir))
        pipe = DreamPipeline.from_pretrained(bundle, device="cpu")
        N = cfg.sample.num_iter
        gen, grids = {}, {}
        for name, K, T in (("K=1", 1, None), (f"SAD K={args.candidates} T={N // 2}", args.candidates, N // 2)):
            print(f"generating {2 * args.prompts} images with {name} ...", flush=True)
            r = evaluate_generation(pipe, args.prompts, K, T)
            gen[name] = r["metrics"]
            grids[name] = r["images"]["val"]
        metrics["generation"] = gen
        for (imgs, prompts, _, _), fname in zip(grids.values(), ("samples_k1.png", "samples_sad.png")):
            caption_grid(imgs[:32], prompts[:32], ncols=8).save(out / fname)
    metrics["total_minutes"] = (time.perf_counter() - t_start) / 60
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    report = write_report(out, metrics)
    print(report.read_text())
    print(f"wrote {out}/ (report.md, metrics.json, loss_curves.png, sample grids)")
    return 0


def _train_summary(result: Any, cfg: DreamConfig) -> dict[str, Any]:
    from dream_fast.train.metrics import read_metrics

    recs = [r for r in read_metrics(Path(result.out_dir) / "metrics.jsonl") if "loss" in r]
    last = recs[-1] if recs else {}
    tail = recs[-5:] if recs else []
    mean = lambda k: float(np.mean([r[k] for r in tail if k in r and r[k] is not None])) if tail else math.nan
    return {"steps": result.steps, "epochs": result.epochs, "minutes": last.get("elapsed_s", 0) / 60,
            "samples_per_sec": mean("samples_per_s"), "loss_diff": mean("loss_diff"), "loss_clip": mean("loss_clip")}


def _plot(run_dir: Any, path: Path) -> None:
    try:
        from dream_fast.train.plot import plot_run

        plot_run(run_dir, path)
    except Exception as e:  # a plot must never fail the demo
        log.warning("could not draw loss curves: %s", e)
