"""Benchmark of kernels/decoder_fill.py: reference vs torch.compile vs the Triton variants
(triton = backward parallel over batch chunks; triton-serial = one chunk, the batch walked by
every program as before), fwd and fwd+bwd, each provider's ratio to the eager reference last.

`python -m benchmarks.benchmark_decoder_fill [--csv benchmarks/results/cpu.csv] [--quick]`, or
`pytest benchmarks/benchmark_decoder_fill.py` (pytest-benchmark) for one small shape.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from dream_fast.kernels.decoder_fill import (
    DEFAULT_VARIANT,
    VARIANTS,
    DecoderFillFunction,
    bytes_moved,
    decoder_fill_reference,
    make_inputs,
)

from benchmarks.common import (
    maybe_compile,
    op_speed_test,
    timed_callable,
)
from benchmarks.kernel_variants import split_provider, variant_main

OP = "decoder_fill"
MODES = ("fwd", "fwd+bwd")
TRITON_PROVIDERS = ("triton", "triton-serial")


def gpu_shapes() -> list[dict[str, Any]]:
    # DREAM-B decoder: 256 tokens, 64 buffer rows, width 768; K = kept tokens (25/50/100%).
    return [dict(B=64, L=256, D=768, S=64, K=k) for k in (64, 128, 256)]


def cpu_shapes() -> list[dict[str, Any]]:
    return [dict(B=16, L=256, D=768, S=64, K=k) for k in (64, 256)]


def quick_shapes() -> list[dict[str, Any]]:
    return [dict(B=2, L=37, D=80, S=5, K=20)]


def _triton(variant: str):
    def op(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L):
        return DecoderFillFunction.apply(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L, variant)

    return op


def _bytes(inputs: dict, mode: str) -> float:
    fwd = bytes_moved(**inputs)
    h = inputs["h_BSKD"]
    B, _, D = h.shape
    P = inputs["pos_PD"].shape[0]
    # Backward: read dy (output-sized), write dh (h-sized) and fp32 dpos (one partial per batch
    # chunk, re-read by the reduction: counted once, the serial variant's traffic).
    bwd = B * P * D * h.element_size() + h.numel() * h.element_size() + P * D * 4
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def setup(provider: str, mode: str, device: str, dtype: torch.dtype, **shape):
    """The one setup shared by main(), pytest-benchmark and the GPU suite: (fn, bytes, flops)."""
    inputs = make_inputs(device, dtype, requires_grad=mode != "fwd", **shape)
    if provider in ("reference", "compiled"):
        op = maybe_compile(decoder_fill_reference, provider)
    else:
        op = _triton(split_provider(provider, DEFAULT_VARIANT, VARIANTS))
    return timed_callable(op, inputs, mode), _bytes(inputs, mode), None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference", "compiled", *TRITON_PROVIDERS])
def test_decoder_fill_speed(benchmark, provider, mode):
    op_speed_test(sys.modules[__name__], benchmark, provider, mode)


def main(argv: list[str] | None = None) -> list[dict]:
    return variant_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
