"""Benchmark of the sampler: dream_fast's fast path against the plain eager path of the same model
in the same run, SAD cost (K = 5, T = N/2) against K = 1, eager against torch.compile, and MFU.

`python -m benchmarks.benchmark_sampler [--presets bench_ref_tiny] [--batches 1 8] [--compile block step]`
times text conditioning + the generation loop (image decoding excluded) of random models on CPU.
"plain" is `DreamSampler(fast=False)`: every fast path off (the model's own decode at every step,
the text projected at every step for every row, the head through its modules), the reference the
tests compare the fast path with. Calls are interleaved so machine load biases both alike.
MFU: matmul FLOPs of the fast path (counted once with torch's FlopCounterMode: the useful work, the
same numerator for both rows) over time, against a matmul measured in the same run.
`run_gpu(device, budget_s, env)` is the GPU-suite hook (eager vs CUDA graphs).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from benchmarks.common import (
    RESULTS_DIR,
    append_rows,
    env_info,
    interleaved,
    make_row,
    measure,
    print_table,
)
from dream_fast.config import DreamConfig, get_preset
from dream_fast.model.dream import build_model
from dream_fast.sampling.sampler import DreamSampler, draw_noise

OP = "sampler"


def build(
    preset: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int | None = None,
    seed: int = 0,
):
    """A random model of `preset` in eval mode; text_cond t5 becomes precomputed (random features)."""
    cfg: DreamConfig = get_preset(preset)
    if cfg.model.text_cond == "t5":
        cfg.model.text_cond = "precomputed"
    if steps is not None:
        cfg.sample.num_iter = steps
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.loss).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # the head predicts exactly 0 at init; give it work that depends on z
        for p in model.diffloss.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cfg, model


def sampler_call(
    cfg: DreamConfig,
    model,
    batch: int,
    K: int,
    T: int | None,
    use_graphs: bool,
    cfg_scale: float = 3.0,
    seed: int = 0,
    fast: bool = True,
    compile: str = "off",
) -> Callable[[], torch.Tensor]:
    """fn() that conditions on random text and samples one batch (what a serving call does)."""
    m = cfg.model
    dev = model.z_proj.weight.device
    dt = model.z_proj.weight.dtype
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, m.vocab_size, (batch, m.text_context), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    ids = ids.to(dev)
    emb = torch.randn(batch, m.text_cond_len, m.text_cond_dim, generator=g).to(dev, dt)
    mask = torch.ones(batch, m.text_cond_len, dtype=torch.bool, device=dev)
    sampler = DreamSampler(model, use_cuda_graphs=use_graphs, fast=fast, compile=compile)
    S = model.diffloss.sample_diffusion.num_timesteps
    steps = cfg.sample.num_iter

    def fn() -> torch.Tensor:
        with torch.no_grad():
            txt, hidden, hmask = model.text_features(ids) if (K > 1 or m.text_cond == "tower") else (None,) * 3
            if m.text_cond == "tower":
                cond = model.text_condition(hidden, hmask)
            else:
                cond = model.text_condition(emb, mask)
            noise = draw_noise(list(range(seed, seed + batch)), K, m.seq_len, m.token_dim, S, dev)
            return sampler.sample(cond, noise, steps, cfg_scale, threshold=T, text_emb_BP=txt).tokens_BLC

    return fn


def _row(preset, provider, mode, batch, steps, dtype, times, env):
    return make_row(OP, provider, mode, f"preset={preset},N={steps},cfg=3,B={batch}", dtype, times, env)


def call_flops(fn: Callable) -> float:
    """Matmul FLOPs of one call (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def _mfu(flops: float, ms: float, peak_tflops: float) -> str:
    return f"{flops / (ms * 1e-3) / 1e12 / peak_tflops:.3f}" if peak_tflops else "n/a"


def cpu_rows(
    presets, batches, reps: int, env: dict, K: int = 5, compile_modes=(), peak_tflops: float = 0.0, log=print
) -> tuple[list[dict], list[dict]]:
    """(CSV rows, summary rows): plain vs fast for K = 1 and SAD K at T = N/2 at each batch size;
    then fast eager vs each compile mode at K = 1."""
    rows, summary = [], []
    for preset in presets:
        cfg, model = build(preset)
        N = cfg.sample.num_iter
        T = N // 2
        for B in batches:
            r = max(2, reps if B <= 8 else reps // 2)
            res = {}
            for kk, tt, mode in ((1, None, "K=1"), (K, T, f"K={K},T={T}")):
                plain = sampler_call(cfg, model, B, kk, tt, False, fast=False)
                fast = sampler_call(cfg, model, B, kk, tt, False, fast=True)
                tp, tf = interleaved(plain, fast, r)
                flops = call_flops(fast)
                rows.append(_row(preset, "plain_eager", mode, B, N, torch.float32, tp, env))
                rows.append(_row(preset, "dream_fast", mode, B, N, torch.float32, tf, env))
                res[kk] = (tp["p50"], tf["p50"])
                summary.append(
                    {
                        "row": f"sampling {mode}",
                        "preset": preset,
                        "batch": B,
                        "plain ms": f"{tp['p50']:.0f}",
                        "dream_fast ms": f"{tf['p50']:.0f}",
                        "speed-up": f"{tp['p50'] / tf['p50']:.2f}x",
                        "MFU plain": _mfu(flops, tp["p50"], peak_tflops),
                        "MFU fast": _mfu(flops, tf["p50"], peak_tflops),
                    }
                )
                log(f"[{preset} B={B} {mode}] plain {tp['p50']:.0f} ms, fast {tf['p50']:.0f} ms", flush=True)
            (p1, f1), (pk, fk) = res[1], res[K]
            summary.append(
                {
                    "row": f"SAD K={K} T={T} cost / K=1",
                    "preset": preset,
                    "batch": B,
                    "plain ms": f"{pk / p1:.2f}x",
                    "dream_fast ms": f"{fk / f1:.2f}x",
                    "speed-up": "",
                    "MFU plain": "",
                    "MFU fast": "",
                }
            )
            for cm in compile_modes:
                eager = sampler_call(cfg, model, B, 1, None, False, fast=True)
                comp = sampler_call(cfg, model, B, 1, None, False, fast=True, compile=cm)
                t0 = time.perf_counter()
                comp()  # compiles
                first_s = time.perf_counter() - t0
                from dream_fast.compile import compile_counts

                te, tc = interleaved(eager, comp, r)
                rows.append(_row(preset, f"dream_fast+compile_{cm}", "K=1", B, N, torch.float32, tc, env))
                summary.append(
                    {
                        "row": f"sampling K=1, compile={cm} vs eager fast",
                        "preset": preset,
                        "batch": B,
                        "plain ms": f"{te['p50']:.0f} (eager)",
                        "dream_fast ms": f"{tc['p50']:.0f} (first call {first_s:.0f} s)",
                        "speed-up": f"{te['p50'] / tc['p50']:.2f}x",
                        "MFU plain": "",
                        "MFU fast": f"graphs {sum(v for k, v in compile_counts().items() if k.startswith('sample'))}",
                    }
                )
                log(f"[{preset} B={B}] compile={cm}: eager {te['p50']:.0f} ms, compiled {tc['p50']:.0f} ms", flush=True)
    return rows, summary


# ----------------------------------------------------------------------------- GPU suite hook
def run_gpu(device: str = "cuda", budget_s: float = 120.0, env: dict | None = None) -> list[dict]:
    """Eager vs CUDA-graph sampler latency at batch 1 and 32 (DREAM-B shapes, random weights,
    bf16, 32 steps, cfg 3), plus SAD K=5 T=16 at batch 1. On CPU (suite --smoke) a tiny run."""
    env = env or env_info(device)
    deadline = time.monotonic() + budget_s
    is_cuda = torch.device(device).type == "cuda"
    preset, steps, dtype = ("B", 32, torch.bfloat16) if is_cuda else ("tiny", 4, torch.float32)
    cfg, model = build(preset, device, dtype, steps=steps)
    rows = []
    configs = [(1, 1, None), (32, 1, None), (1, 5, steps // 2)] if is_cuda else [(1, 1, None), (2, 2, 2)]
    for B, K, T in configs:
        mode = "K=1" if K == 1 else f"K={K},T={T}"
        times = {}
        for provider, graphs in (("eager", False), ("cuda_graph", True)):
            if not is_cuda and graphs:
                continue
            if time.monotonic() > deadline:
                print(f"[sampler] {provider} {mode} B={B}: skipped, time budget spent", flush=True)
                continue
            fn = sampler_call(cfg, model, B, K, T, graphs)
            t0 = time.monotonic()
            fn()  # warm-up; with graphs this captures the plan once
            if is_cuda:
                torch.cuda.synchronize()
            first = time.monotonic() - t0
            reps = 5 if is_cuda else 2
            t = measure(fn, warmup=1, reps=reps, device=device)
            times[provider] = t["p50"]
            rows.append(_row(preset, provider, mode, B, steps, dtype, t, env))
            print(f"[sampler] {provider} {mode} B={B}: p50 {t['p50']:.1f} ms (first call {first:.1f}s)", flush=True)
        if "eager" in times and "cuda_graph" in times:
            print(f"[sampler] {mode} B={B}: captured is {times['eager'] / times['cuda_graph']:.2f}x faster", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["bench_ref_tiny"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    ap.add_argument("--compile", nargs="*", default=[], choices=["block", "step"],
                    help="also time these sample.compile modes against the eager fast path")
    ap.add_argument("--csv", default=None, help="append rows here (default benchmarks/results/cpu.csv)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = env_info("cpu")
    from dream_fast.train.metrics import measured_matmul_tflops

    peak = measured_matmul_tflops(torch.device("cpu"), n=1024)
    print(f"# measured fp32 matmul peak {peak:.4f} TFLOP/s ({args.threads} threads)", flush=True)
    rows, summary = cpu_rows(args.presets, args.batches, args.reps, env, compile_modes=args.compile,
                             peak_tflops=peak)
    append_rows(args.csv or RESULTS_DIR / "cpu.csv", rows)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n# sampler on {env['device']}, {args.threads} threads, torch {env['torch']}, git {env['git_sha']}, "
        f"load average {load} (timings skew with load), matmul peak {peak:.4f} TFLOP/s"
    )
    print_table(summary, list(summary[0]))
    return rows


if __name__ == "__main__":
    main()
