"""Where `dream-fast demo`'s time goes, phase by phase, and what its evaluation saved.

On an exported demo bundle (any step count: evaluation cost does not depend on how well it trained):
  1. encoder evaluation the old way (three linear_probe calls and zero_shot_classify, each decoding and
     encoding its images) against the demo's one shared feature extraction: figures must match;
  2. generation, K = 1 and SAD, at a few batch sizes (seconds per image; the demo's 2 x 200 prompts each);
  3. training: seconds per step over the demo's schedule (fp32 and bf16), hence the 1573-step time.
Prints wall and process CPU seconds (on a loaded machine the CPU seconds are the better estimate of an
idle one) and writes a JSON next to --json.

    python -m benchmarks.demo_profile demo_out --threads 1 --prompts 48 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def timed(fn, *a, **k) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    return out, time.perf_counter() - w0, time.process_time() - c0


def encoder_old_way(bundle: Path, data_dir: Path, n_train: int, n_val: int) -> dict[str, float]:
    """The demo's encoder evaluation before the shared extraction (kept here as the baseline)."""
    from dream_fast.data import shard_pattern
    from dream_fast.eval import EvalImages, linear_probe, shapes_class_prompts, zero_shot_classify
    from dream_fast.pretrained import load_pretrained

    pre = load_pretrained(bundle)
    size = pre.cfg.model.img_size
    res: dict[str, float] = {}
    for key in ("shape_id", "colour_id", "position_id"):
        tr = EvalImages(shard_pattern(data_dir, "train"), size, label_key=key, max_samples=n_train)
        va = EvalImages(shard_pattern(data_dir, "val"), size, label_key=key, max_samples=n_val)
        res[f"probe_{key[:-3]}"] = linear_probe(pre.model, tr, va, label_key=key, epochs=90)["top1"]
    names, prompts = shapes_class_prompts("shape_id", per_class=32)
    va = EvalImages(shard_pattern(data_dir, "val"), size, label_key="shape_id", max_samples=n_val)
    res["zeroshot_shape"] = zero_shot_classify(pre.model, pre.tokenizer, va, prompts, label_key="shape_id",
                                               class_names=names)["top1"]
    return res


def main() -> None:
    from dream_fast import demo
    from dream_fast.config import load_config
    from dream_fast.sampling import DreamPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_out", help="a demo output folder (holds model/ and data/)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=48, help="prompts per timing of generation (default 48)")
    ap.add_argument("--batch-sizes", default="32,64", help="generation batch sizes to time")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: encoder,generation,training")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out, skip = Path(args.demo_out), set(filter(None, args.skip.split(",")))
    bundle, data = out / "model", out / "data"
    rep: dict[str, Any] = {"machine": demo.machine_info(), "load_start": os.getloadavg()}
    print(f"{rep['machine']['cpu']}, flags {rep['machine']['flags']}, {torch.get_num_threads()} threads, "
          f"load {rep['load_start']}", flush=True)

    if "encoder" not in skip:
        old, w_old, c_old = timed(encoder_old_way, bundle, data, 5000, 1000)
        new, w_new, c_new = timed(demo.evaluate_encoder, bundle, data, 5000, 1000)
        rep["encoder"] = {"old": old, "new": new, "same_figures": old == new, "old_wall_s": w_old,
                          "old_cpu_s": c_old, "new_wall_s": w_new, "new_cpu_s": c_new}
        print(f"encoder eval: old {w_old:.1f} s wall / {c_old:.1f} s CPU, shared features {w_new:.1f} s / "
              f"{c_new:.1f} s CPU ({c_old / c_new:.2f}x less CPU); same figures: {old == new} ({new})", flush=True)

    if "generation" not in skip:
        pipe = DreamPipeline.from_pretrained(bundle, device="cpu")
        N = pipe.cfg.sample.num_iter
        gen: dict[str, Any] = {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            for name, K, T in (("K=1", 1, None), ("SAD K=5", 5, N // 2)):
                from dream_fast.eval import shapes_eval_prompts

                prompts = [p for p, _ in shapes_eval_prompts(args.prompts, split="val", seed=1234)]
                res, w, c = timed(pipe, prompts, num_candidates=K, threshold=T, seed=0, batch_size=bs,
                                  progress=False)
                gen[f"{name} batch {bs}"] = {"wall_s_per_image": w / len(prompts), "cpu_s_per_image": c / len(prompts),
                                             "demo_400_images_cpu_s": 400 * c / len(prompts)}
                print(f"generation {name} batch {bs}: {w / len(prompts):.3f} s/image wall, {c / len(prompts):.3f} "
                      f"CPU -> the demo's 400 images ~{400 * c / len(prompts):.0f} CPU s", flush=True)
        rep["generation"] = gen

    if "training" not in skip:
        cfg = load_config(None, [], "tiny")
        sched = demo.demo_schedule(demo.DEMO_STEPS, cfg.train.batch_size, cfg.data.shapes_num_train)
        demo.apply_plan(cfg, sched, cfg.data.shapes_num_train)
        tr: dict[str, Any] = {}
        epochs = demo.DEMO_STEPS * cfg.train.batch_size / cfg.data.shapes_num_train
        for prec in ("fp32", "bf16"):
            for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
                cost = demo.mean_step_seconds(cfg, prec, epochs, clock=clock)
                tr[f"{prec} {clock_name}"] = {**cost, "demo_steps_s": cost["sec_per_step"] * demo.DEMO_STEPS}
                print(f"training {prec}: {cost['sec_per_step']:.3f} {clock_name} s/step (best of 3 per mask ratio) "
                      f"-> {demo.DEMO_STEPS} steps ~{cost['sec_per_step'] * demo.DEMO_STEPS / 60:.1f} min; at ratios "
                      f"{cost['step_seconds_at']}", flush=True)
        rep["training"] = tr
    rep["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2, default=float))


if __name__ == "__main__":
    main()
