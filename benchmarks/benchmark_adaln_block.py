"""Benchmark of kernels/adaln_block.py: reference vs torch.compile vs the Triton variants
(triton = grouped program order + SiLU once; triton-baseline = the 2-D grid kernel before it),
fwd and fwd+bwd, with each provider's ratio to the eager reference printed last.

`python -m benchmarks.benchmark_adaln_block [--csv benchmarks/results/cpu.csv] [--quick]`, or
`pytest benchmarks/benchmark_adaln_block.py` (pytest-benchmark) for one small shape.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from dream_fast.kernels.adaln_block import (
    DEFAULT_VARIANT,
    VARIANTS,
    AdaLNBlockFunction,
    adaln_block_reference,
    bytes_moved,
    flops,
    make_inputs,
)

from benchmarks.common import (
    maybe_compile,
    op_speed_test,
    timed_callable,
)
from benchmarks.kernel_variants import split_provider, variant_main

OP = "adaln_block"
MODES = ("fwd", "fwd+bwd")
TRITON_PROVIDERS = ("triton", "triton-baseline")


def gpu_shapes() -> list[dict[str, Any]]:
    # DREAM-B diffusion head: 64 images × 256 tokens × diffusion_batch_mul 4 rows, width 1024;
    # plus one sampling-sized batch (64 prompts × cfg 2 × 16 tokens per step).
    return [dict(N=64 * 256 * 4, W=1024), dict(N=64 * 2 * 16, W=1024)]


def cpu_shapes() -> list[dict[str, Any]]:
    return [dict(N=1024, W=256)]  # the shared 2-core machine: keep it small


def quick_shapes() -> list[dict[str, Any]]:
    return [dict(N=64, W=96)]


def _triton(variant: str):
    def op(**kw):
        # Straight to the Function: the provider must not fall back to the reference silently.
        save = torch.is_grad_enabled() and any(t.requires_grad for t in kw.values())
        return AdaLNBlockFunction.apply(*kw.values(), 1e-6, save, variant)

    return op


def setup(provider: str, mode: str, device: str, dtype: torch.dtype, **shape):
    """The one setup shared by main(), pytest-benchmark and the GPU suite: (fn, bytes, flops)."""
    inputs = make_inputs(device, dtype, requires_grad=mode != "fwd", **shape)
    if provider in ("reference", "compiled"):
        op = maybe_compile(adaln_block_reference, provider)
    else:
        op = _triton(split_provider(provider, DEFAULT_VARIANT, VARIANTS))
    fwd_flops = flops(**inputs)
    fwd_bytes = bytes_moved(**inputs, save=mode != "fwd")
    # backward: two GEMMs per forward GEMM; bytes roughly another pass over the saved activations
    nflops = {"fwd": fwd_flops, "fwd+bwd": 3 * fwd_flops}[mode]
    nbytes = {"fwd": fwd_bytes, "fwd+bwd": 2 * fwd_bytes}[mode]
    return timed_callable(op, inputs, mode), nbytes, nflops


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "compiled", *TRITON_PROVIDERS])
def test_adaln_block_speed(benchmark, provider, mode):
    op_speed_test(sys.modules[__name__], benchmark, provider, mode)


def main(argv: list[str] | None = None) -> list[dict]:
    return variant_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
