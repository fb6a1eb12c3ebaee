"""The paper's claims in miniature on the shapes domain (slower than CI; results committed).

(a) Masking Warmup vs FLUID masking vs contrastive-only, equal wall-clock budgets: linear-probe
    accuracy and generation oracle accuracy. (b) SAD K=5 vs K=1 at T=N/2 and T=N/4 on the same
    prompts and seeds: oracle accuracy with 95% Wilson intervals, the paired difference with a
    bootstrap interval, and the network passes each used.

    python -m benchmarks.repro_shapes --minutes 8 --prompts 500 --out runs/repro
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dream_fast.config import DreamConfig, load_config
from dream_fast.demo import apply_plan, evaluate_encoder, plan_epochs

RESULTS = Path(__file__).resolve().parent / "results"


def variant_config(name: str, out: Path, data_dir: Path) -> DreamConfig:
    cfg = load_config(None, [], "tiny")
    cfg.name = name
    cfg.train.out_dir = str(out / name / "run")
    cfg.train.resume = "auto"
    cfg.data.shapes_dir = str(data_dir)
    if name == "fluid":
        cfg.mask.schedule = "fluid"
        cfg.loss.clip_weight = 0.0
    elif name == "contrastive_only":
        cfg.loss.diff_weight = 0.0
        cfg.loss.diff_threshold = 1.01  # never eligible: the decoder and head never run
    return cfg.validate()


def train_variant(name: str, out: Path, data_dir: Path, minutes: float) -> tuple[DreamConfig, Path, dict]:
    from dream_fast.train import export_checkpoint, train

    cfg = variant_config(name, out, data_dir)
    plan_path = out / name / "plan.json"
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        plan = plan_epochs(cfg, minutes, cfg.data.shapes_num_train)
        plan_path.write_text(json.dumps(plan, indent=2))
    apply_plan(cfg, plan, cfg.data.shapes_num_train)
    cfg.train.max_minutes = minutes
    result = train(cfg, progress=True)
    bundle = export_checkpoint(result.out_dir, out / name / "model")
    return cfg, Path(bundle), {"steps": result.steps, "epochs": result.epochs, "plan": plan}


def correct_all(images, metas) -> np.ndarray:
    """Per-image 0/1: every attribute the prompt names read correctly by the oracle."""
    from dream_fast.eval.oracle import ATTRIBUTES, _truth, read_images

    rows = []
    for r, meta in zip(read_images(images), metas):
        t, got = _truth(meta), r.ids()
        rows.append(all(got[f"{a}_id"] == t[f"{a}_id"] for a in ATTRIBUTES))
    return np.array(rows, dtype=float)


def paired_diff_ci(a: np.ndarray, b: np.ndarray, reps: int = 5000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of mean(b) - mean(a) over the same prompts."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(reps, len(a)))
    d = b[idx].mean(1) - a[idx].mean(1)
    return [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]


def generate(pipe, prompts: list[str], K: int, T: int | None) -> tuple[list, float]:
    t0 = time.perf_counter()
    res = pipe(prompts, num_candidates=K, threshold=T, seed=0, batch_size=32, progress=True)
    return res.images, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget per variant")
    ap.add_argument("--prompts", type=int, default=500, help="seen-combination prompts for generation")
    ap.add_argument("--out", default="runs/repro")
    ap.add_argument("--variants", nargs="+", default=["dream", "fluid", "contrastive_only"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    data_dir = out / "data"
    from dream_fast.data import write_shapes_shards
    from dream_fast.eval import oracle_accuracy, shapes_eval_prompts, wilson_interval
    from dream_fast.sampling import DreamPipeline

    cfg0 = variant_config("dream", out, data_dir)
    d = cfg0.data
    write_shapes_shards(d.shapes_dir, d.shapes_num_train, d.shapes_num_val, d.shapes_num_val, seed=d.shapes_seed,
                        img_size=cfg0.model.img_size)
    pairs = shapes_eval_prompts(args.prompts, split="val", seed=777)
    prompts, metas = [p for p, _ in pairs], [m for _, m in pairs]
    report: dict[str, Any] = {"minutes_per_variant": args.minutes, "prompts": args.prompts,
                              "load_avg_start": os.getloadavg(), "variants": {}, "sad": {}}
    bundles = {}
    for name in args.variants:
        cfg, bundle, info = train_variant(name, out, data_dir, args.minutes)
        bundles[name] = (cfg, bundle)
        entry = {"train": info, "encoder": evaluate_encoder(bundle, data_dir)}
        if cfg.loss.diff_weight > 0:
            pipe = DreamPipeline.from_pretrained(bundle, device="cpu")
            imgs, secs = generate(pipe, prompts, 1, None)
            acc = oracle_accuracy(imgs, metas)
            entry["generation_k1"] = {**acc, "seconds": secs}
        report["variants"][name] = entry
        (RESULTS / "repro_shapes.json").write_text(json.dumps(report, indent=2, default=float))

    if "dream" in bundles:  # (b) SAD on the Masking Warmup model, same prompts and seeds
        cfg, bundle = bundles["dream"]
        pipe = DreamPipeline.from_pretrained(bundle, device="cpu")
        N = cfg.sample.num_iter
        base_imgs, base_s = generate(pipe, prompts, 1, None)
        base = correct_all(base_imgs, metas)
        n = len(base)
        report["sad"]["K=1"] = {"all": base.mean(), "ci95": wilson_interval(int(base.sum()), n),
                                "passes": N, "seconds": base_s}
        for T in (N // 2, N // 4):
            imgs, secs = generate(pipe, prompts, 5, T)
            c = correct_all(imgs, metas)
            report["sad"][f"K=5 T={T}"] = {
                "all": c.mean(), "ci95": wilson_interval(int(c.sum()), n), "passes": 5 * T + N - T,
                "seconds": secs, "diff_vs_k1": c.mean() - base.mean(), "diff_ci95": paired_diff_ci(base, c)}
    report["load_avg_end"] = os.getloadavg()
    (RESULTS / "repro_shapes.json").write_text(json.dumps(report, indent=2, default=float))
    md = to_markdown(report)
    (RESULTS / "repro_shapes.md").write_text(md)
    print(md)
    return 0


def to_markdown(r: dict[str, Any]) -> str:
    pct = lambda x: f"{100 * x:.1f}%"
    lines = [f"# Shapes reproduction ({r['minutes_per_variant']:g} min of training per variant, 2 CPU threads)", "",
             "## (a) Masking Warmup vs FLUID vs contrastive-only", "",
             "| variant | steps | epochs | probe shape | probe colour | probe position | zero-shot shape "
             "| gen. all (K=1) | gen. colour | gen. position | gen. shape |", "|---" * 11 + "|"]
    for name, v in r["variants"].items():
        e, g = v["encoder"], v.get("generation_k1")
        gen = (f"{pct(g['all'])} [{pct(g['all_ci95'][0])}, {pct(g['all_ci95'][1])}] | {pct(g['colour'])} | "
               f"{pct(g['position'])} | {pct(g['shape'])}") if g else "– | – | – | –"
        lines.append(f"| {name} | {v['train']['steps']} | {v['train']['epochs']:.2f} | {pct(e['probe_shape'])} | "
                     f"{pct(e['probe_colour'])} | {pct(e['probe_position'])} | {pct(e['zeroshot_shape'])} | {gen} |")
    if r["sad"]:
        lines += ["", f"## (b) SAD on {r['prompts']} seen-combination prompts (same seeds; all-attributes accuracy)",
                  "", "| sampler | all | 95% CI | vs K=1 (paired bootstrap 95% CI) | network passes | seconds |",
                  "|---|---|---|---|---|---|"]
        for name, s in r["sad"].items():
            diff = (f"{100 * s['diff_vs_k1']:+.1f} pts [{100 * s['diff_ci95'][0]:+.1f}, {100 * s['diff_ci95'][1]:+.1f}]"
                    if "diff_vs_k1" in s else "–")
            lines.append(f"| {name} | {pct(s['all'])} | [{pct(s['ci95'][0])}, {pct(s['ci95'][1])}] | {diff} | "
                         f"{s['passes']} | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
