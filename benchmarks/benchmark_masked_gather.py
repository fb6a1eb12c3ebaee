"""Benchmark of kernels/masked_gather.py: reference vs torch.compile vs the Triton variants
(triton = rows per program chosen by size; triton-baseline = one register tile per program;
triton-det = the default variant in deterministic mode, backward without atomics), fwd and
fwd+bwd, with each provider's ratio to the eager reference printed last.

`python -m benchmarks.benchmark_masked_gather [--csv benchmarks/results/cpu.csv] [--quick]`, or
`pytest benchmarks/benchmark_masked_gather.py` (pytest-benchmark) for one small shape.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from dream_fast.kernels.masked_gather import (
    DEFAULT_VARIANT,
    VARIANTS,
    MaskedGatherFunction,
    bytes_moved,
    make_inputs,
    masked_gather_reference,
)

from benchmarks.common import (
    maybe_compile,
    op_speed_test,
    timed_callable,
)
from benchmarks.kernel_variants import split_provider, variant_main
from dream_fast.kernels import dispatch

OP = "masked_gather"
MODES = ("fwd", "fwd+bwd")
TRITON_PROVIDERS = ("triton", "triton-baseline", "triton-det")


def gpu_shapes() -> list[dict[str, Any]]:
    # DREAM-B: 256 tokens of 16 dims, 64 buffer rows, width 768; K = kept tokens (25/50/100%).
    return [dict(B=64, L=256, C=16, D=768, S=64, K=k) for k in (64, 128, 256)]


def cpu_shapes() -> list[dict[str, Any]]:
    return [dict(B=16, L=256, C=16, D=768, S=64, K=k) for k in (64, 256)]


def quick_shapes() -> list[dict[str, Any]]:
    return [dict(B=2, L=37, C=12, D=80, S=5, K=20)]


def _triton(variant: str, det: bool):
    def op(**kw):
        eps = kw.pop("eps")
        previous = dispatch._deterministic
        dispatch.set_deterministic(det)  # the forward records the mode its backward will use
        try:
            return MaskedGatherFunction.apply(*kw.values(), eps, variant)
        finally:
            dispatch.set_deterministic(previous)

    return op


def _bytes(inputs: dict, mode: str) -> float:
    fwd = bytes_moved(**inputs)
    B, L, C = inputs["tokens_BLC"].shape
    S, D = inputs["buffer_SD"].shape
    K = inputs["keep_idx_BK"].shape[1]
    e = inputs["tokens_BLC"].element_size()
    # Backward re-reads the forward inputs, reads dy, zero-fills and writes d tokens, adds fp32 dpos.
    bwd = fwd + B * L * C * e + (S + L) * D * 4 * 2 + B * K * C * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _flops(inputs: dict, mode: str) -> float:
    B, _, C = inputs["tokens_BLC"].shape
    D = inputs["weight_DC"].shape[0]
    K = inputs["keep_idx_BK"].shape[1]
    proj = 2.0 * B * K * C * D  # the projection; LN and adds are a few flops per byte
    return {"fwd": proj, "bwd": 2 * proj, "fwd+bwd": 3 * proj}[mode]


def setup(provider: str, mode: str, device: str, dtype: torch.dtype, **shape):
    """The one setup shared by main(), pytest-benchmark and the GPU suite: (fn, bytes, flops)."""
    inputs = make_inputs(device, dtype, requires_grad=mode != "fwd", **shape)
    if provider in ("reference", "compiled"):
        op = maybe_compile(masked_gather_reference, provider)
    elif provider == "triton-det":
        op = _triton(DEFAULT_VARIANT, det=True)
    else:
        op = _triton(split_provider(provider, DEFAULT_VARIANT, VARIANTS), det=False)
    return timed_callable(op, inputs, mode), _bytes(inputs, mode), _flops(inputs, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "compiled", *TRITON_PROVIDERS])
def test_masked_gather_speed(benchmark, provider, mode):
    op_speed_test(sys.modules[__name__], benchmark, provider, mode)


def main(argv: list[str] | None = None) -> list[dict]:
    return variant_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
