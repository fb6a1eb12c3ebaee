"""Training-step benchmark: the trainer's own step (forward, both losses, backward, clip, AdamW, EMA)
at the tiny and B presets, reporting samples/s, tokens/s, TFLOP/s and MFU against a matmul measured
on the same machine; plus the tiny preset's data path (in-memory shapes -> tokens) on its own.

`python -m benchmarks.benchmark_train_step [--presets tiny,bench_ref_tiny] [--batch 64] [--csv PATH]`;
`run_gpu(device, budget_s, env)` is the hook benchmarks/gpu_suite.py calls (tiny + B in bf16).
Mask ratio is fixed at 0.75 (both losses active, the late-training regime); FLOPs come from
dream_fast.model.flops_per_sample (3 x forward matmul FLOPs).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, append_rows, env_info, make_row, measure, measured_ceilings, print_table
from dream_fast.config import DreamConfig, get_preset
from dream_fast.model.dream import build_model, count_params, flops_per_sample
from dream_fast.model.masking import num_masked, random_orders

MASK_RATIO = 0.75


def _config(preset: str, batch: int, precision: str) -> DreamConfig:
    cfg = get_preset(preset)
    cfg.train.batch_size, cfg.train.precision, cfg.train.zero_stage = batch, precision, 0
    cfg.optim.lr = 1e-4
    return cfg


def setup(preset: str, device: torch.device, batch: int = 64, precision: str = "fp32"):
    """(step_fn, cfg, num_params): one optimizer step of the trainer's StepRunner on random inputs."""
    from dream_fast.train.batches import ModelInputs
    from dream_fast.train.dist import DistInfo
    from dream_fast.train.ema import EMA
    from dream_fast.train.engine import TorchEngine
    from dream_fast.train.trainer import StepRunner

    cfg = _config(preset, batch, precision)
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m, cfg.loss).to(device)
    info = DistInfo(0, 1, 0, device, False)
    engine = TorchEngine(model, cfg, info)
    engine.set_lr(1e-4)
    ema = EMA(*engine.ema_shards(), decay=cfg.optim.ema_decay)
    gen = torch.Generator(device=device).manual_seed(0)
    runner = StepRunner(cfg, engine, ema, info, gen)
    L = m.seq_len
    tokens = torch.randn(batch, L, m.token_dim, device=device)
    ids = torch.randint(3, m.vocab_size, (batch, m.text_context), device=device)
    ids[:, 0], ids[:, -1] = 1, 2
    emb = mask = None
    if m.text_cond != "tower":  # precomputed/T5 conditioning: random embeddings of the right shape
        emb = torch.randn(batch, m.text_cond_len, m.text_cond_dim, device=device)
        mask = torch.ones(batch, m.text_cond_len, dtype=torch.bool, device=device)
    inputs = ModelInputs(tokens, ids, emb, mask)
    n_masked = num_masked(MASK_RATIO, L)

    def step() -> None:
        order = random_orders(batch, L, device=device, generator=gen)
        runner.micro_step(inputs, n_masked, order)
        runner.post_step()

    return step, cfg, count_params(model)


def data_path_rate(batch: int = 64, n: int = 4096) -> float:
    """Samples/s of the tiny preset's input side: in-memory uint8 shapes -> pixel tokens."""
    from dream_fast.train.batches import InMemoryStream, InputMaker

    cfg = get_preset("tiny")
    S = cfg.model.img_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, S, S), dtype=np.uint8)
    ids = torch.zeros(n, cfg.model.text_context, dtype=torch.long)
    stream = InMemoryStream(images, ids, ["a red circle"] * n, batch, 0, 0, 1)
    maker = InputMaker(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    steps = 50
    for _ in range(steps):
        maker(next(stream), gen)
    return steps * batch / (time.perf_counter() - t0)


def bench(
    presets: list[str],
    device: torch.device,
    batch: int,
    precision: str,
    reps: int,
    env: dict[str, str],
    peak_tflops: float,
) -> list[dict[str, Any]]:
    rows = []
    for preset in presets:
        step, cfg, n_params = setup(preset, device, batch, precision)
        times = measure(step, warmup=3, reps=reps, device=device)
        flops = flops_per_sample(cfg.model, MASK_RATIO) * batch
        row = make_row(
            "train_step",
            "torch",
            "fwd+bwd+adamw",
            f"preset={preset},B={batch},r={MASK_RATIO}",
            precision,
            times,
            env,
            flops=flops,
        )
        sps = batch / (times["p50"] * 1e-3)
        row["_samples_s"] = round(sps, 1)
        row["_tokens_s"] = round(sps * cfg.model.seq_len)
        row["_mfu"] = round(flops / (times["p50"] * 1e-3) / 1e12 / peak_tflops, 4) if peak_tflops else None
        row["_params_M"] = round(n_params / 1e6, 2)
        rows.append(row)
    return rows


def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def run_gpu(device: str = "cuda", budget_s: float = 120.0, env: dict[str, str] | None = None) -> list[dict]:
    """gpu_suite hook: tiny and B presets in bf16 on one GPU (B is skipped when the budget is short)."""
    dev = torch.device(device)
    env = env or env_info(dev)
    peak = measured_ceilings(dev)["matmul_tflops"]
    t0 = time.monotonic()
    rows = bench(["tiny"], dev, 256, "bf16", 20, env, peak)
    if time.monotonic() - t0 < budget_s / 3:
        rows += bench(["B"], dev, 64, "bf16", 10, env, peak)
    for r in rows:
        print(
            f"train_step {r['shape']}: {r['_samples_s']} samples/s, {r['_tokens_s']} tokens/s, MFU {r['_mfu']} "
            f"(vs measured {peak} TFLOP/s bf16 matmul), {r['_params_M']}M params"
        )
    return _public(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,bench_ref_tiny", help="comma list: tiny, bench_ref_tiny, B, ...")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--csv", default=None, help=f"append rows here (e.g. {RESULTS_DIR / 'train_step.csv'})")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = env_info(device)
    ceil = measured_ceilings(device)
    print(
        f"device {env['device']}, threads {env['threads']}, load avg {env['load_avg']}, measured matmul "
        f"{ceil['matmul_tflops']} TFLOP/s ({ceil['matmul_dtype']})"
    )
    rows = bench(args.presets.split(","), device, args.batch, args.precision, args.reps, env, ceil["matmul_tflops"])
    print_table(
        [
            dict(r, samples_s=r["_samples_s"], tokens_s=r["_tokens_s"], mfu=r["_mfu"], params_M=r["_params_M"])
            for r in rows
        ],
        ["shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "samples_s", "tokens_s", "tflops", "mfu", "params_M"],
    )
    if device.type == "cpu":
        print(f"tiny data path (in-memory shapes -> pixel tokens): {data_path_rate(args.batch):.0f} samples/s")
    if args.csv:
        append_rows(args.csv, _public(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    raise SystemExit(main())
