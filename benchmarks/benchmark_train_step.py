"""Training-step benchmark: the trainer's own step (forward, both losses, backward, clip, AdamW, EMA)
of dream_fast against the plain eager path of the same model in the same run, eager against
torch.compile, and MFU against a matmul measured in the same run; plus the tiny preset's data path.

`python -m benchmarks.benchmark_train_step [--presets bench_ref_tiny] [--batch 64] [--compile block step]`;
`run_gpu(device, budget_s, env)` is the hook benchmarks/gpu_suite.py calls (tiny + B in bf16).
Rows: mask ratio 0.75 (both losses active, the late-training regime), and the mean step over a fixed
draw of ratios from the Masking-Warmup distribution at mu = 1 (truncated normal, sigma
mask.mask_ratio_std), where low ratios skip the decoder and head. "plain" = every fast path off:
attention through SDPA (not the short-sequence CPU path), torch's per-parameter AdamW loop,
rate-0 dropouts kept (TorchEngine(fast=False)). FLOPs: dream_fast.model.flops_per_sample.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    RESULTS_DIR,
    append_rows,
    env_info,
    interleaved,
    make_row,
    measure,
    measured_ceilings,
    print_table,
)
from dream_fast.config import DreamConfig, get_preset
from dream_fast.model.dream import build_model, count_params, flops_per_sample
from dream_fast.model.masking import num_masked, random_orders

MASK_RATIO = 0.75


def _config(preset: str, batch: int, precision: str) -> DreamConfig:
    cfg = get_preset(preset)
    cfg.train.batch_size, cfg.train.precision, cfg.train.zero_stage = batch, precision, 0
    cfg.optim.lr = 1e-4
    return cfg


def setup(preset: str, device: torch.device, batch: int = 64, precision: str = "fp32", fast: bool = True,
          compile: str = "off"):
    """(step_fn(n_masked=None), cfg, num_params): one optimizer step of the trainer's StepRunner on
    random inputs (n_masked None: ratio 0.75). fast=False: the plain eager path."""
    from dream_fast.dist import DistInfo
    from dream_fast.train.ema import EMA
    from dream_fast.train.engine import TorchEngine
    from dream_fast.train.inputs import ModelInputs
    from dream_fast.train.trainer import StepRunner

    cfg = _config(preset, batch, precision)
    cfg.train.compile = compile
    m = cfg.model
    if not fast:
        m.attn_backend = "sdpa"
    torch.manual_seed(0)
    model = build_model(m, cfg.loss).to(device)
    info = DistInfo(0, 1, 0, device, False)
    engine = TorchEngine(model, cfg, info, fast=fast)
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
    default_n = num_masked(MASK_RATIO, L)

    def step(n_masked: int | None = None) -> None:
        order = random_orders(batch, L, device=device, generator=gen)
        runner.micro_step(inputs, default_n if n_masked is None else n_masked, order)
        runner.post_step()

    return step, cfg, count_params(model)


def data_path_rate(batch: int = 64, n: int = 4096) -> float:
    """Samples/s of the tiny preset's input side: in-memory uint8 shapes -> pixel tokens."""
    from dream_fast.data.streams import InMemoryStream
    from dream_fast.train.inputs import InputMaker

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


def warmup_ratios(cfg: DreamConfig, n: int = 8, mu: float = 1.0, seed: int = 0) -> list[float]:
    """A fixed draw of n mask ratios from the Masking-Warmup distribution at mu (sorted)."""
    from dream_fast.model.masking import _truncnorm

    rng = np.random.default_rng(seed)
    return sorted(float(_truncnorm(mu, cfg.mask.mask_ratio_std, 0.0, 1.0, rng)) for _ in range(n))


def compare_cpu(preset: str, batch: int, reps: int, env: dict, peak: float, compile_modes=(), log=print):
    """Summary rows and CSV rows: plain vs dream_fast at r = 0.75 and over the warm-up ratios, then
    eager vs each train.compile mode at r = 0.75."""
    dev = torch.device("cpu")
    plain, cfg, _ = setup(preset, dev, batch, "fp32", fast=False)
    fast, _, _ = setup(preset, dev, batch, "fp32", fast=True)
    L = cfg.model.seq_len
    summary, rows = [], []

    def add(name, tp, tf, flops, a="plain eager", b="dream_fast"):
        rows.append(make_row("train_step", a.replace(" ", "_"), name, f"preset={preset},B={batch}", "fp32", tp, env,
                             flops=flops))
        rows.append(make_row("train_step", b.replace(" ", "_"), name, f"preset={preset},B={batch}", "fp32", tf, env,
                             flops=flops))
        summary.append({
            "row": name, "preset": preset, "batch": batch,
            f"{a} ms": f"{tp['p50']:.0f}", f"{b} ms": f"{tf['p50']:.0f}",
            "speed-up": f"{tp['p50'] / tf['p50']:.2f}x",
            "MFU a": f"{flops / (tp['p50'] * 1e-3) / 1e12 / peak:.3f}",
            "MFU b": f"{flops / (tf['p50'] * 1e-3) / 1e12 / peak:.3f}",
        })
        log(f"[train {name}] {a} {tp['p50']:.0f} ms, {b} {tf['p50']:.0f} ms", flush=True)

    tp, tf = interleaved(plain, fast, reps, warmup=2)
    add(f"train step r={MASK_RATIO}", tp, tf, flops_per_sample(cfg.model, MASK_RATIO) * batch)
    ratios = warmup_ratios(cfg)
    ns = [num_masked(r, L) for r in ratios]
    elig = [cfg.loss.diff_eligible(n, L) for n in ns]
    flops = sum(flops_per_sample(cfg.model, r, decoder=e) for r, e in zip(ratios, elig)) / len(ratios) * batch

    def seq(f):
        return lambda: [f(n) for n in ns]

    tp, tf = interleaved(seq(plain), seq(fast), max(2, reps // 3), warmup=1)
    tp = {k: v / len(ns) for k, v in tp.items()}
    tf = {k: v / len(ns) for k, v in tf.items()}
    add(f"train step, Masking-Warmup mu=1 ({len(ns)} ratios {ratios[0]:.2f}..{ratios[-1]:.2f})", tp, tf, flops)
    for cm in compile_modes:
        comp, _, _ = setup(preset, dev, batch, "fp32", fast=True, compile=cm)
        t0 = time.perf_counter()
        comp()
        comp(num_masked(0.6, L))  # a second kept-token count: the dynamic graph
        first_s = time.perf_counter() - t0
        tp, tf = interleaved(fast, comp, reps, warmup=1)
        from dream_fast.compile import compile_counts

        add(f"train step r={MASK_RATIO}, compile={cm} (first 2 calls {first_s:.0f} s, graphs "
            f"{sum(v for k, v in compile_counts().items() if k.startswith('train'))})", tp, tf,
            flops_per_sample(cfg.model, MASK_RATIO) * batch, a="eager fast", b=f"compile {cm}")
    return summary, rows


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
    ap.add_argument("--presets", default="bench_ref_tiny", help="comma list: tiny, bench_ref_tiny, B, ...")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--compile", nargs="*", default=[], choices=["block", "step"],
                    help="also time these train.compile modes against the eager fast path")
    ap.add_argument("--csv", default=None, help=f"append rows here (e.g. {RESULTS_DIR / 'train_step.csv'})")
    ap.add_argument("--no-data-path", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = env_info(device)
    from dream_fast.train.metrics import measured_matmul_tflops

    peak = measured_matmul_tflops(device, n=1024)  # fp32, 1024^2, now, at these threads
    print(
        f"device {env['device']}, threads {env['threads']}, load avg {env['load_avg']}, measured fp32 matmul "
        f"{peak:.4f} TFLOP/s", flush=True
    )
    summary, rows = [], []
    for preset in args.presets.split(","):
        s, r = compare_cpu(preset, args.batch, args.reps, env, peak, args.compile)
        summary += s
        rows += r
    print(f"\n# train step, {env['threads']} threads, git {env['git_sha']}, load avg {os.getloadavg()}, "
          f"fp32 matmul peak {peak:.4f} TFLOP/s (MFU a / b: the two columns)")
    print_table(summary, list(summary[0]))
    if not args.no_data_path:
        print(f"tiny data path (in-memory shapes -> pixel tokens): {data_path_rate(args.batch):.0f} samples/s")
    if args.csv:
        append_rows(args.csv, rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    raise SystemExit(main())
