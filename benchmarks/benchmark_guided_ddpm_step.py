"""Benchmark of kernels/guided_ddpm_step.py: reference vs torch.compile vs Triton (forward only).

`python -m benchmarks.benchmark_guided_ddpm_step [--csv benchmarks/results/cpu.csv] [--quick]`, or
`pytest benchmarks/benchmark_guided_ddpm_step.py` (pytest-benchmark) for one small shape.
A memory-bound op: the figure of merit is GB/s against the measured copy ceiling.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
from dream_fast.kernels.dispatch import use_triton
from dream_fast.kernels.guided_ddpm_step import (
    bytes_moved,
    guided_ddpm_step,
    guided_ddpm_step_reference,
    make_inputs,
)

from benchmarks.common import (
    RESULTS_DIR,
    append_rows,
    env_info,
    maybe_compile,
    print_table,
    providers_for,
    run_op_benchmarks,
    timed_callable,
)

OP = "guided_ddpm_step"
MODES = ("fwd",)


def gpu_shapes() -> list[dict[str, Any]]:
    # DREAM-B head rows (64·256·4) with 16 latent channels, with and without CFG.
    return [dict(N=64 * 256 * 4, C=16, cfg=True), dict(N=64 * 256 * 4, C=16, cfg=False)]


def cpu_shapes() -> list[dict[str, Any]]:
    return [dict(N=4096, C=16, cfg=True)]


def quick_shapes() -> list[dict[str, Any]]:
    return [dict(N=64, C=12, cfg=True)]


def setup(provider: str, mode: str, device: str, dtype: torch.dtype, **shape):
    """The one setup shared by main(), pytest-benchmark and the GPU suite: (fn, bytes, flops)."""
    if mode != "fwd":
        raise ValueError(f"{OP} is forward-only (sampling); mode {mode!r} unsupported")
    inputs = make_inputs(device, dtype, **shape)
    if provider == "triton":
        if not use_triton(inputs["x_NC"]):  # never time the reference under the kernel's name
            raise RuntimeError("the triton provider needs CUDA tensors and DREAM_KERNELS != reference")
        op = guided_ddpm_step
    elif provider in ("reference", "compiled"):
        op = maybe_compile(guided_ddpm_step_reference, provider)
    else:
        raise ValueError(f"provider {provider!r} unknown; allowed: reference, compiled, triton")
    return timed_callable(op, inputs, mode), bytes_moved(**inputs), None


@pytest.mark.parametrize("provider", ["reference", "compiled", "triton"])
def test_guided_ddpm_step_speed(benchmark, provider):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if provider not in providers_for(device):
        pytest.skip(f"{provider} needs CUDA")
    shape = gpu_shapes()[0] if device == "cuda" else quick_shapes()[0]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fn, _, _ = setup(provider, "fwd", device, dtype, **shape)
    benchmark(fn)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--csv", default=None, help="append rows here (default benchmarks/results/<device>.csv)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    ap.add_argument("--providers", default=None, help="comma list, default: all for this device")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = quick_shapes() if args.quick else (gpu_shapes() if device == "cuda" else cpu_shapes())
    env = env_info(device)
    print(f"# {OP} on {env['device']} (load avg {env['load_avg']}, {env['threads']} threads)")
    providers = args.providers.split(",") if args.providers else None
    rows = run_op_benchmarks(OP, setup, shapes, device, dtype, MODES, providers, reps=args.reps, env=env)
    append_rows(args.csv or RESULTS_DIR / f"{device}.csv", rows)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
