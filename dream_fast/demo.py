"""`dream-fast demo`: the whole of DREAM on a CPU, with no downloads, the same work on every machine.

Writes the shapes shards, trains the tiny preset for a fixed number of steps (DEMO_STEPS, seed
DEMO_SEED: the committed reference run's schedule), checkpointing every CKPT_EVERY steps so that
`--resume` continues an interrupted or budget-limited run to the full count, exports the EMA
weights, evaluates the encoder (linear probes and zero-shot from one shared feature extraction)
and the generator (attribute oracle on seen and held-out combinations, K = 1 vs SAD), and writes
report.md (sample grids, loss curves, a plain reading, the figures against the reference run with
95% intervals, the machine), metrics.json and plan.json. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dream_fast.config import DreamConfig, load_config
from dream_fast.model.masking import num_masked, random_orders, sample_mask_ratio

log = logging.getLogger("dream_fast.demo")

# The fixed work of the demo. The committed reference run
# (benchmarks/results/2026-11-30_demo-v4_epyc-2c-avx512bf16) sized
# its lr cosine, Masking Warmup and EMA to 2.2176 epochs (a 10-minute plan on its CPU) and its budget ended
# it at step 1573 (2.013 epochs at batch 64): the demo trains those 1573 steps of that same schedule, so
# every machine does the work whose figures are committed. --steps N keeps the schedule's shape (it spans
# SCHEDULE_OVER_RUN x the samples of N steps).
DEMO_STEPS = 1573
DEMO_SEED = 0
REFERENCE_SCHEDULE_EPOCHS = 2.217641860014835
REFERENCE_BATCH, REFERENCE_NUM_TRAIN = 64, 50000
SCHEDULE_OVER_RUN = REFERENCE_SCHEDULE_EPOCHS / (DEMO_STEPS * REFERENCE_BATCH / REFERENCE_NUM_TRAIN)
CKPT_EVERY = 100
PLAN_KIND = "fixed_steps_v1"

# committed reference runs, by training precision (folders under benchmarks/results/); the report picks
# the one trained in this run's precision, else the first with a note.
REFERENCE_RUNS = {"bf16": "2026-11-30_demo-v4_epyc-2c-avx512bf16"}
REFERENCE_N_VAL = 1000  # probe / zero-shot validation images of the reference runs

LOAD_SAMPLE_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEMO_STEPS}: the committed reference run's count)")
    p.add_argument("--seed", type=int, default=None, help=f"training seed (default {DEMO_SEED})")
    p.add_argument("--minutes", type=float, default=None,
                   help="optional training budget in minutes: the run stops there, says it is short and "
                        "prints the command that resumes it to the full step count")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint to its planned step count")
    p.add_argument("--config", default=None, help="YAML config (default: the `tiny` preset)")
    p.add_argument("--prompts", type=int, default=200, help="evaluation prompts per split (seen, held-out)")
    p.add_argument("--candidates", type=int, default=5, help="SAD candidates K (default 5)")
    p.add_argument("--probe-train", type=int, default=5000, help="linear-probe training images (default 5000)")
    p.add_argument("--probe-val", type=int, default=REFERENCE_N_VAL,
                   help=f"linear-probe / zero-shot validation images (default {REFERENCE_N_VAL})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--skip-eval", action="store_true", help="train and export only")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.precision=fp32")


# --------------------------------------------------------------------------------------------
# schedule: the reference run's, at any step count
# --------------------------------------------------------------------------------------------


def demo_schedule(steps: int, batch_size: int, num_train: int) -> dict[str, Any]:
    """The plan apply_plan reads for a fixed-step demo of `steps` steps (see SCHEDULE_OVER_RUN)."""
    from dream_fast.config import preset_tiny

    epochs = SCHEDULE_OVER_RUN * steps * batch_size / num_train
    return {"epochs": epochs, "scale": epochs / preset_tiny().train.epochs}


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
# time-budget planning (benchmarks/repro_shapes.py sizes its runs to minutes with it)
# --------------------------------------------------------------------------------------------


def _step_seconds(cfg: DreamConfig, ratios: list[float], precision: str, reps: int = 3,
                  clock: Any = time.perf_counter) -> list[float]:
    """Seconds per training step (fwd + bwd + AdamW) of a fresh model at a few mask ratios.

    The fastest of `reps` timings: another process busy for a moment only slows some of them."""
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
            t0 = clock()
            with amp:
                loss = model(tokens, ids, num_masked(r, L), random_orders(B, L), emb, mask)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i:  # the first step warms allocator and caches
                times.append(clock() - t0)
        out.append(min(times))
    return out


def mean_step_seconds(cfg: DreamConfig, precision: str, epochs: float | None = None,
                      clock: Any = time.perf_counter) -> dict[str, Any]:
    """Mean seconds per step over a schedule of `epochs` (default cfg.train.epochs): the step cost
    depends on the mask ratio (the decoder and head only run on micro-batches masked >= 50%).
    clock=time.process_time measures CPU seconds (a loaded machine's estimate of an idle one)."""
    ratios = [0.3, 0.6, 0.95]
    t_low, t_mid, t_high = _step_seconds(cfg, ratios, precision, clock=clock)
    L = cfg.model.seq_len

    def step_time(r: float) -> float:
        if num_masked(r, L) / L < cfg.loss.diff_threshold:
            return t_low
        return t_mid + (t_high - t_mid) * (r - 0.6) / 0.35

    rng = np.random.default_rng(0)
    grid = np.linspace(0, cfg.train.epochs if epochs is None else epochs, 9)
    avg = float(np.mean([np.mean([step_time(sample_mask_ratio(cfg.mask, e, rng)) for _ in range(400)])
                         for e in grid]))
    return {"sec_per_step": avg, "step_seconds_at": dict(zip(ratios, [t_low, t_mid, t_high]))}


def plan_epochs(cfg: DreamConfig, minutes: float, num_train: int, safety: float = 0.85) -> dict[str, Any]:
    """How many epochs fit in `minutes` (the preset's schedule rescaled to them)."""
    from dream_fast.train.engine import resolve_precision

    precision = resolve_precision(cfg, torch.device("cpu"))
    cost = mean_step_seconds(cfg, precision)
    avg = cost["sec_per_step"]
    steps = minutes * 60.0 * safety / avg
    epochs = steps * cfg.train.batch_size / num_train
    return {"epochs": epochs, "scale": epochs / cfg.train.epochs, "sec_per_step": avg,
            "samples_per_sec": cfg.train.batch_size / avg, "precision": precision,
            "step_seconds_at": cost["step_seconds_at"]}


# --------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------

CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16",
             "amx_tile": "AMX-TILE"}


def machine_info() -> dict[str, Any]:
    """CPU model, the flags that decide the precision, cores and torch threads (from /proc/cpuinfo)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    import platform

    if model == "unknown":
        model = platform.processor() or platform.machine()
    return {"cpu": model, "flags": {name: f in flags for f, name in CPU_FLAGS.items()},
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def choose_precision(cfg: DreamConfig, machine: dict[str, Any]) -> tuple[str, str]:
    """(precision, why). `auto` is decided by the CPU's flags, not by a timing, so that a busy machine
    cannot flip it between two runs of the same seed; the bf16/fp32 matmul ratio is measured and reported."""
    from dream_fast.train.engine import cpu_bf16_speedup

    if cfg.train.precision != "auto":
        return cfg.train.precision, f"set by train.precision={cfg.train.precision}"
    if not torch.cuda.is_available():
        speedup = cpu_bf16_speedup()
        native = machine["flags"].get("AVX512-BF16") or machine["flags"].get("AMX-BF16")
        if native:
            return "bf16", (f"auto: the CPU has native bf16 (AVX512-BF16/AMX); a bf16 matmul measured "
                            f"{speedup:.1f}x fp32 here")
        return "fp32", (f"auto: no AVX512-BF16 or AMX on this CPU, bf16 would be emulated (a bf16 matmul "
                        f"measured {speedup:.1f}x fp32 here)")
    return "bf16" if torch.cuda.is_bf16_supported() else "fp32", "auto on CUDA"


class LoadSampler:
    """os.getloadavg() (1-minute average) sampled at most every LOAD_SAMPLE_S seconds."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._last = -math.inf

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= LOAD_SAMPLE_S:
            self._last = now
            try:
                self.samples.append(os.getloadavg()[0])
            except OSError:
                pass

    def summary(self) -> dict[str, Any]:
        s = self.samples
        if not s:
            return {"n": 0}
        return {"n": len(s), "mean": float(np.mean(s)), "min": float(min(s)), "max": float(max(s))}


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


ENCODER_LABELS = ("shape_id", "colour_id", "position_id")


def encoder_features(model: Any, source: Any, img_size: int, n: int, with_embeddings: bool,
                     batch_size: int = 128) -> dict[str, Any]:
    """One pass of the frozen encoder over the first `n` images of `source`: probe features (buffer
    mean, as dream_fast.eval.probe_features), optionally the normalised image embeddings (as
    image_embeddings) from the same encoder outputs, and the metas. The three probes and zero-shot
    read these, instead of decoding and encoding the same images four times."""
    import torch.nn.functional as F

    from dream_fast.eval import EvalImages, images_to_tokens
    from dream_fast.eval.features import encode_all, frozen, image_tokenizer_for

    tok = image_tokenizer_for(model)
    feats, embs, metas = [], [], []
    S = model.buffer_size
    for batch in EvalImages(source, img_size, max_samples=n).batches(batch_size):
        enc = encode_all(model, images_to_tokens(model, batch["image"], tok))
        feats.append((enc[:, :S] if S > 0 else enc).mean(dim=1).float().cpu())
        if with_embeddings:
            with frozen(model):
                embs.append(F.normalize(model.image_embedding(enc).float(), dim=-1).cpu())
        metas += batch["meta"]
    if not feats:
        raise ValueError(f"no images read from {source!r}")
    return {"features": torch.cat(feats), "embeddings": torch.cat(embs) if embs else None, "metas": metas}


def evaluate_encoder(bundle_dir: Path, data_dir: Path, n_train: int = 5000, n_val: int = 1000) -> dict[str, Any]:
    """Linear probes (shape, colour, position) and zero-shot shape classification, all from one
    feature extraction per split (the same figures as three linear_probe calls and zero_shot_classify)."""
    from dream_fast.data import shard_pattern
    from dream_fast.eval import class_text_embeddings, linear_probe, shapes_class_prompts, zero_shot_from_embeddings
    from dream_fast.pretrained import load_pretrained

    pre = load_pretrained(bundle_dir)
    size = pre.cfg.model.img_size
    tr = encoder_features(pre.model, shard_pattern(data_dir, "train"), size, n_train, with_embeddings=False)
    va = encoder_features(pre.model, shard_pattern(data_dir, "val"), size, n_val, with_embeddings=True)
    res: dict[str, Any] = {}
    for key in ENCODER_LABELS:
        r = linear_probe(None, (tr["features"], [m[key] for m in tr["metas"]]),
                         (va["features"], [m[key] for m in va["metas"]]), label_key=key, epochs=90)
        res[f"probe_{key[:-3]}"] = r["top1"]
    names, prompts = shapes_class_prompts("shape_id", per_class=32)
    cls = class_text_embeddings(pre.model, pre.tokenizer, prompts)
    labels = torch.tensor([int(m["shape_id"]) for m in va["metas"]])
    res["zeroshot_shape"] = zero_shot_from_embeddings(va["embeddings"], cls, labels, names)["top1"]
    return res


# --------------------------------------------------------------------------------------------
# intervals and the comparison with the reference run
# --------------------------------------------------------------------------------------------


def wilson(p: float, n: int) -> tuple[float, float]:
    from dream_fast.eval import wilson_interval

    return wilson_interval(round(p * n), n)


def newcombe(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """95% interval of p1 - p2 from the two Wilson intervals (Newcombe 1998, method 10)."""
    l1, u1 = wilson(p1, n1)
    l2, u2 = wilson(p2, n2)
    p1, p2 = round(p1 * n1) / n1, round(p2 * n2) / n2
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def figures(metrics: dict[str, Any], n_val: int) -> dict[str, tuple[float, int]]:
    """{figure name: (accuracy, n)} of a demo metrics.json."""
    out: dict[str, tuple[float, int]] = {}
    enc = metrics.get("encoder") or {}
    n_enc = int(metrics.get("encoder_n_val", n_val))
    for k, label in (("probe_shape", "probe shape"), ("probe_colour", "probe colour"),
                     ("probe_position", "probe position"), ("zeroshot_shape", "zero-shot shape")):
        if k in enc:
            out[label] = (float(enc[k]), n_enc)
    for name, res in (metrics.get("generation") or {}).items():
        for split, r in res.items():
            acc = r["oracle"]
            for attr in ("colour", "position", "shape", "size", "all"):
                out[f"{name} {split} {attr}"] = (float(acc[attr]), int(acc["n"]))
    return out


def reference_dir(precision: str) -> tuple[Path | None, str]:
    """(folder of the committed reference run for this precision, note)."""
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    name = REFERENCE_RUNS.get(precision)
    note = ""
    if name is None:
        prec, name = next(iter(REFERENCE_RUNS.items()))
        note = (f"no reference run was committed in {precision}; compared with the {prec} one "
                f"(precision alone may move some figures)")
    path = root / name
    return (path if (path / "metrics.json").is_file() else None), note


def compare(metrics: dict[str, Any], ref: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure both runs have: values, Wilson intervals, the Newcombe interval of the
    difference, and `differs` when that interval excludes 0."""
    mine, theirs = figures(metrics, REFERENCE_N_VAL), figures(ref, REFERENCE_N_VAL)
    rows = []
    for k, (p1, n1) in mine.items():
        if k not in theirs:
            continue
        p2, n2 = theirs[k]
        lo, hi = newcombe(p1, n1, p2, n2)
        rows.append({"figure": k, "this": p1, "n": n1, "this_ci": wilson(p1, n1), "ref": p2, "ref_n": n2,
                     "ref_ci": wilson(p2, n2), "diff": p1 - p2, "diff_ci": (lo, hi), "differs": lo > 0 or hi < 0})
    return rows


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def resume_command(out: Path) -> str:
    return f"dream-fast demo --out {out} --resume"


def short_banner(metrics: dict[str, Any]) -> list[str]:
    """The first lines of the console summary and report.md when the run trained fewer steps than
    planned (resume it), or was planned shorter than the demo's full count (start a full one)."""
    tr, out = metrics["train"], metrics["out"]
    if tr["steps"] < tr["planned_steps"]:
        return [f"**SHORT RUN**: trained {tr['steps']} of {tr['planned_steps']} planned steps (stopped by "
                f"{tr['stopped_by_text']}). The model is undertrained: its figures are not comparable with the "
                f"reference run and are expected to be far lower.",
                f"Resume it to the full count: `{resume_command(out)}` "
                f"(or `make demo ARGS=\"--out {out} --resume\"`).", ""]
    if tr["planned_steps"] < DEMO_STEPS:
        return [f"**SHORTENED RUN**: {tr['planned_steps']} steps were planned (--steps), the demo's full count is "
                f"{DEMO_STEPS}. Its figures are not comparable with the reference run.",
                f"The full demo: `dream-fast demo --out {out}` (or `make demo`).", ""]
    return []


def plain_reading(metrics: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One paragraph for a reader who has not read the paper."""
    tr, enc, gen = metrics["train"], metrics.get("encoder"), metrics.get("generation") or {}
    parts = [f"The demo trained one small model ({metrics.get('params_m', 0):.1f} M parameters, "
             f"{tr['steps']} steps) to do two jobs on images of one coloured shape on a plain background: "
             "read a picture (the encoder), and draw a picture from a caption such as \"a small red circle "
             "in the top left\" (the generator)."]
    if enc:
        parts.append(f"As a reader, a simple linear classifier on its features names the shape of "
                     f"{_fmt(enc['probe_shape'])} of unseen images (colour {_fmt(enc['probe_colour'])}, "
                     f"position {_fmt(enc['probe_position'])}); matching images to caption words alone, "
                     f"without any classifier, it gets the shape {_fmt(enc['zeroshot_shape'])} right.")
    k1 = gen.get("K=1", {})
    if k1:
        v, h = k1["val"]["oracle"], k1["heldout"]["oracle"]
        parts.append(f"As a drawer, a fixed checker reads its images back: it draws the asked colour in "
                     f"{_fmt(v['colour'])} and the asked position in {_fmt(v['position'])} of them, the asked "
                     f"shape in {_fmt(v['shape'])}, and everything right at once in {_fmt(v['all'])} for "
                     f"combinations it saw in training, {_fmt(h['all'])} for combinations it never saw"
                     + (" (so it composes the caption's words, not only recalls pictures)."
                        if v["all"] >= 0.3 and h["all"] >= 0.5 * v["all"] else "."))
        sad = next((r for name, r in gen.items() if name != "K=1"), None)
        if sad:
            s = sad["val"]["oracle"]
            lo, hi = newcombe(s["all"], s["n"], v["all"], v["n"])
            sig = "a real gain" if lo > 0 else ("a real loss" if hi < 0 else "within noise at this sample size")
            parts.append(f"Drawing several candidates and keeping the one its own encoder finds closest to the "
                         f"caption (SAD) gives {_fmt(s['all'])} ({_pts(s['all'] - v['all'])} points, {sig}).")
        if v["shape"] < min(v["colour"], v["position"]) - 0.05:
            parts.append("Shape is the hard part: the grids show the right colour in the right place more often "
                         "than the right outline.")
    if tr["steps"] < DEMO_STEPS:
        parts.append(f"This run is short ({tr['steps']} steps, the demo's full count is {DEMO_STEPS}), so these "
                     "figures understate what the method does.")
    elif rows:
        off = [r["figure"] for r in rows if r["differs"]]
        if off:
            parts.append(f"Against the committed reference run, {len(rows) - len(off)} of {len(rows)} figures "
                         f"agree within their 95% intervals; {', '.join(off)} differ{'s' if len(off) == 1 else ''}.")
        else:
            parts.append(f"All {len(rows)} figures agree with the committed reference run within their 95% intervals.")
    return " ".join(parts)


def write_report(out: Path, metrics: dict[str, Any]) -> Path:
    lines = short_banner(metrics) + ["# dream_fast demo report", ""]
    ref_info = metrics.get("reference") or {}
    rows = ref_info.get("rows") or []
    lines += [plain_reading(metrics, rows), ""]
    grids = [(t, f) for t, f in (("K = 1", "samples_k1.png"), ("SAD", "samples_sad.png")) if (out / f).is_file()]
    if grids:
        lines += ["| " + " | ".join(f"{t} (seen captions)" for t, _ in grids) + " |",
                  "|" + "---|" * len(grids),
                  "| " + " | ".join(f"![{t}]({f})" for t, f in grids) + " |", ""]
    if (out / "loss_curves.png").is_file():
        lines += ["![loss curves](loss_curves.png)", ""]

    if rows:
        lines += [f"## Against the reference run (`{ref_info['path']}`, {ref_info.get('precision', '?')}, "
                  f"{ref_info.get('steps', '?')} steps)", ""]
        if ref_info.get("note"):
            lines += [f"Note: {ref_info['note']}.", ""]
        lines += ["95% intervals: Wilson for each accuracy, Newcombe for the difference; **differs** where the "
                  "difference's interval excludes 0.", "",
                  "| figure | this run | 95% CI | reference | 95% CI | difference (pts) | 95% CI | |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['figure']} | {_fmt(r['this'])} | [{_fmt(r['this_ci'][0])}, {_fmt(r['this_ci'][1])}] "
                         f"| {_fmt(r['ref'])} | [{_fmt(r['ref_ci'][0])}, {_fmt(r['ref_ci'][1])}] | {_pts(r['diff'])} "
                         f"| [{_pts(r['diff_ci'][0])}, {_pts(r['diff_ci'][1])}] | "
                         f"{'**differs**' if r['differs'] else 'ok'} |")
        lines.append("")
    elif ref_info.get("missing"):
        lines += [f"Reference run not found ({ref_info['missing']}): no comparison.", ""]

    mc, tr = metrics["machine"], metrics["train"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mc["flags"].items())
    load = tr.get("load") or {}
    load_txt = "not sampled"
    if load.get("n"):
        load_txt = (f"1-minute load average {load['mean']:.2f} mean (min {load['min']:.2f}, max {load['max']:.2f}) "
                    f"on {mc['cores']} cores, {load['n']} samples every {LOAD_SAMPLE_S:g} s")
    lines += ["## Machine", f"- CPU: {mc['cpu']}; {flags}",
              f"- {mc['cores']} cores, {mc['threads']} torch threads, torch {mc['torch']}",
              f"- precision {tr['precision']}: {tr['precision_why']}",
              f"- load during training: {load_txt}", ""]
    ph = metrics.get("phases", {})
    lines += ["## Time by phase", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in ph.items()]
    lines += [f"| total | {60 * metrics.get('total_minutes', 0):.1f} |", ""]
    lines += [
        "## Training",
        f"- preset `{metrics.get('preset', 'tiny')}`, {metrics.get('params_m', 0):.2f} M parameters, "
        f"seed {tr['seed']}, "
        f"{tr['steps']} of {tr['planned_steps']} steps ({tr['epochs']:.2f} epochs; the schedule spans "
        f"{tr['schedule_epochs']:.2f} epochs, as in the reference run), ~{tr.get('samples_per_sec', 0):.0f} samples/s",
        f"- final losses: diffusion {tr.get('loss_diff', float('nan')):.4f}, "
        f"contrastive {tr.get('loss_clip', float('nan')):.4f}", ""]
    enc = metrics.get("encoder")
    if enc:
        lines += [f"## Encoder ({metrics.get('encoder_n_val')} validation images)",
                  "| linear probe shape | colour | position | zero-shot shape |", "|---|---|---|---|",
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
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_config(config: str | None, overrides: list[str], out: Path) -> DreamConfig:
    cfg = load_config(config, overrides) if config else load_config(None, overrides, "tiny")
    cfg.train.out_dir = str(out / "run")
    cfg.data.shapes_dir = str(out / "data")
    cfg.train.resume = "auto"
    return cfg.validate()


def _plan(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The run's fixed plan: new (plan.json written), or the one --resume continues."""
    plan_path = out / "plan.json"
    if args.resume:
        if not plan_path.is_file():
            raise FileNotFoundError(f"--resume: {out} holds no demo run (no plan.json); start one with "
                                    f"`dream-fast demo --out {out}`")
        plan = json.loads(plan_path.read_text())
        if plan.get("kind") != PLAN_KIND:
            raise ValueError(f"--resume: {plan_path} was written by an older, time-budgeted demo; start afresh "
                             f"with `dream-fast demo --out {out}` or use another --out")
        for name in ("steps", "seed"):
            given = getattr(args, name)
            if given is not None and given != plan[name]:
                raise ValueError(f"--resume continues the planned run ({name} {plan[name]}); --{name} {given} "
                                 f"would change its schedule: drop --{name}, or start afresh without --resume")
        if args.overrides or args.config:
            raise ValueError("--resume continues the run with the config it started with; drop the config "
                             f"overrides/--config (the run's are in {plan_path})")
        return plan
    steps = DEMO_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    run_dir = out / "run"
    if run_dir.exists():
        print(f"starting afresh: replacing the earlier run in {run_dir} (`--resume` would continue it)", flush=True)
        shutil.rmtree(run_dir)
    return {"kind": PLAN_KIND, "steps": steps, "seed": DEMO_SEED if args.seed is None else args.seed,
            "config": args.config, "overrides": list(args.overrides)}


def main(args: argparse.Namespace) -> int:
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _main(args)
    finally:  # in-process callers (tests) get their settings back
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> int:
    from dream_fast.data import caption_grid, write_shapes_shards
    from dream_fast.model import build_model, count_params
    from dream_fast.train import export_checkpoint, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.minutes is not None and args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(args, out)
    for stale in ("samples_k1.png", "samples_sad.png", "report.md", "metrics.json"):  # an earlier run's
        (out / stale).unlink(missing_ok=True)
    cfg = build_config(plan["config"], plan["overrides"], out)
    d, B = cfg.data, cfg.train.batch_size
    steps = plan["steps"]
    machine = machine_info()
    if "precision" not in plan:
        plan["precision"], plan["precision_why"] = choose_precision(cfg, machine)
    cfg.train.precision, cfg.train.seed, cfg.train.ckpt_every = plan["precision"], plan["seed"], CKPT_EVERY
    cfg.train.log_every = max(1, min(cfg.train.log_every, steps // 3))  # a few points even on a short run
    sched = demo_schedule(steps, B, d.shapes_num_train)
    apply_plan(cfg, sched, d.shapes_num_train)
    plan["schedule_epochs"] = sched["epochs"]
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    print(f"demo: {steps} steps at batch {B}, seed {plan['seed']}, precision {plan['precision']} "
          f"({plan['precision_why']}), {machine['threads']} thread(s) on {machine['cpu']}, out {out}/", flush=True)
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    man = write_shapes_shards(d.shapes_dir, d.shapes_num_train, d.shapes_num_val, d.shapes_num_val,
                              seed=d.shapes_seed, img_size=cfg.model.img_size)
    phases["data"] = time.perf_counter() - t0
    print(f"[data] {d.shapes_num_train} train / {d.shapes_num_val} val / {d.shapes_num_val} held-out images "
          f"({man.get('written', 0)} shards written, {man.get('reused', 0)} reused) in {phases['data']:.1f} s",
          flush=True)

    t0 = time.perf_counter()
    result, bar_info = _train(cfg, steps, args.minutes, train)
    phases["training"] = time.perf_counter() - t0
    bundle = out / "model"
    export_checkpoint(result.out_dir, bundle)
    metrics: dict[str, Any] = {"preset": cfg.name, "plan": plan, "out": str(out), "machine": machine,
                               "params_m": count_params(build_model(cfg.model, device="meta")) / 1e6}
    tr = _train_summary(result, cfg)
    tr.update(planned_steps=steps, seed=plan["seed"], precision=plan["precision"],
              precision_why=plan["precision_why"], schedule_epochs=sched["epochs"], load=bar_info["load"],
              stopped_by=bar_info["why"] or result.stopped_by,
              stopped_by_text=_stop_text(bar_info["why"] or result.stopped_by, args.minutes),
              resumed_from_step=bar_info["first_step"] - 1 if bar_info["first_step"] else None)
    metrics["train"] = tr
    done_now = tr["steps"] - (tr["resumed_from_step"] or 0)
    load = tr["load"]
    print(f"[training] {tr['steps']} of {steps} steps ({done_now} in this run) in {phases['training'] / 60:.1f} min, "
          f"~{tr['samples_per_sec']:.0f} samples/s, precision {plan['precision']}, load "
          + (f"{load['mean']:.2f} (min {load['min']:.2f}, max {load['max']:.2f})" if load.get("n") else "n/a"),
          flush=True)
    banner = short_banner(metrics)
    if banner:
        print("\n".join(b.replace("**", "") for b in banner), flush=True)
    _plot(result.out_dir, out / "loss_curves.png")

    interrupted = tr["stopped_by"] == "signal"
    if interrupted and not args.skip_eval:
        print("[evaluation] skipped: training was interrupted (resume it, and it evaluates at the end)", flush=True)
    if not args.skip_eval and not interrupted:
        from dream_fast.sampling import DreamPipeline

        t0 = time.perf_counter()
        metrics["encoder"] = evaluate_encoder(bundle, Path(d.shapes_dir), args.probe_train, args.probe_val)
        metrics["encoder_n_val"] = args.probe_val
        phases["evaluation: encoder"] = time.perf_counter() - t0
        pipe = DreamPipeline.from_pretrained(bundle, device="cpu")
        N = cfg.sample.num_iter
        gen, grids = {}, {}
        for name, K, T in (("K=1", 1, None), (f"SAD K={args.candidates} T={N // 2}", args.candidates, N // 2)):
            t0 = time.perf_counter()
            r = evaluate_generation(pipe, args.prompts, K, T)
            gen[name] = r["metrics"]
            grids[name] = r["images"]["val"]
            phases[f"evaluation: {name}"] = time.perf_counter() - t0
        metrics["generation"] = gen
        for (imgs, prompts, _, _), fname in zip(grids.values(), ("samples_k1.png", "samples_sad.png")):
            caption_grid(imgs[:32], prompts[:32], ncols=8).save(out / fname)
        ev = sum(v for k, v in phases.items() if k.startswith("evaluation"))
        print(f"[evaluation] {ev:.1f} s: " + ", ".join(f"{k.split(': ')[1]} {v:.1f} s" for k, v in phases.items()
                                                   if k.startswith("evaluation")), flush=True)
    metrics["phases"] = phases
    metrics["reference"] = _reference(metrics, plan["precision"])
    metrics["total_minutes"] = (time.perf_counter() - t_start) / 60
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    report = write_report(out, metrics)
    print(report.read_text())
    if banner:
        print("\n".join(b.replace("**", "") for b in banner), flush=True)
    print(f"wrote {out}/ (report.md, metrics.json, loss_curves.png, sample grids)")
    return 0


def _stop_text(why: str, minutes: float | None) -> str:
    return {"budget": f"the --minutes {minutes:g} budget" if minutes else "the time budget",
            "signal": "an interrupt (Ctrl-C or SIGTERM)", "max_minutes": "train.max_minutes",
            "max_steps": "train.max_steps", "epochs": "the end of the schedule"}.get(why, why)


def _train(cfg: DreamConfig, steps: int, minutes: float | None, train: Any) -> tuple[Any, dict[str, Any]]:
    """Train to `steps` (or the budget) under one tqdm bar: step, loss, samples/s, ETA."""
    import sys
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from dream_fast.train import checkpoint as ckpt_io

    B = cfg.train.batch_size
    done = ckpt_io.latest_checkpoint(Path(cfg.train.out_dir))
    if done is not None:
        st = ckpt_io.read_state(done)
        if int(st["step"]) >= steps:  # nothing left to train: the trainer would take one more step
            print(f"[training] the run in {cfg.train.out_dir} already has its {steps} steps", flush=True)
            res = SimpleNamespace(out_dir=Path(cfg.train.out_dir), steps=int(st["step"]),
                                  epochs=float(st["epoch"]), stopped_by="steps")
            return res, {"load": {"n": 0}, "why": "steps", "first_step": int(st["step"]) + 1}
    budget_s = minutes * 60.0 if minutes else None
    sampler = LoadSampler()
    state: dict[str, Any] = {"bar": None, "why": None, "first_step": None, "t0": time.perf_counter()}

    def on_step(info: dict[str, Any]) -> bool:
        sampler.tick()
        if state["bar"] is None:
            state["first_step"] = info["step"]
            state["bar"] = tqdm(total=steps, initial=info["step"] - 1, desc="training", unit="step",
                                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        bar = state["bar"]
        bar.update(1)
        if info["step"] == state["first_step"]:
            state["t1"] = time.perf_counter()  # after the first step (warm-up, resume loading)
        else:
            rate = (info["step"] - state["first_step"]) * B / (time.perf_counter() - state["t1"])
            bar.set_postfix_str(f"loss {info['loss']:.4f}, {rate:.0f} samples/s", refresh=False)
        if info["step"] >= steps:
            return True
        if budget_s is not None and time.perf_counter() - state["t0"] >= budget_s:
            state["why"] = "budget"
            return True
        return False

    # the trainer's own bar and per-log lines would interleave with ours; its warnings still show
    tlog = logging.getLogger("dream_fast.train.trainer")
    level = tlog.level
    tlog.setLevel(logging.WARNING)
    try:
        result = train(cfg, progress=False, on_step=on_step)
    finally:
        tlog.setLevel(level)
        if state["bar"] is not None:
            state["bar"].close()
    if result.stopped_by == "callback" and state["why"] is None and result.steps >= steps:
        state["why"] = "steps"
    return result, {"load": sampler.summary(), "why": state["why"], "first_step": state["first_step"]}


def _reference(metrics: dict[str, Any], precision: str) -> dict[str, Any]:
    path, note = reference_dir(precision)
    if path is None:
        return {"missing": "benchmarks/results/ is not next to this package"}
    ref = json.loads((path / "metrics.json").read_text())
    rel = f"benchmarks/results/{path.name}"
    return {"path": rel, "note": note, "precision": (ref.get("plan") or {}).get("precision"),
            "steps": (ref.get("train") or {}).get("steps"), "rows": compare(metrics, ref)}


def _train_summary(result: Any, cfg: DreamConfig) -> dict[str, Any]:
    from dream_fast.train.metrics import read_metrics

    path = Path(result.out_dir) / "metrics.jsonl"
    recs = [r for r in read_metrics(path) if "loss" in r] if path.is_file() else []
    last = recs[-1] if recs else {}
    tail = recs[-5:] if recs else []

    def mean(k: str) -> float:
        vals = [r[k] for r in tail if k in r and r[k] is not None]
        return float(np.mean(vals)) if vals else math.nan

    return {"steps": result.steps, "epochs": result.epochs, "minutes": last.get("elapsed_s", 0) / 60,
            "samples_per_sec": mean("samples_per_s"), "loss_diff": mean("loss_diff"), "loss_clip": mean("loss_clip")}


def _plot(run_dir: Any, path: Path) -> None:
    try:
        from dream_fast.train.plot import plot_run

        plot_run(run_dir, path)
    except Exception as e:  # a plot must never fail the demo
        log.warning("could not draw loss curves: %s", e)
