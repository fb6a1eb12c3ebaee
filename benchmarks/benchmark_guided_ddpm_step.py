"""Benchmark of kernels/guided_ddpm_step.py: reference vs torch.compile vs Triton (forward only;
one Triton variant), with each provider's ratio to the eager reference printed last.

`python -m benchmarks.benchmark_guided_ddpm_step [--csv benchmarks/results/cpu.csv] [--quick]`, or
`pytest benchmarks/benchmark_guided_ddpm_step.py` (pytest-benchmark) for one small shape.
A memory-bound op: the figure of merit is GB/s against the measured copy ceiling.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from dream_fast.kernels.dispatch import interpreter_active, set_provider, use_triton
from dream_fast.kernels.guided_ddpm_step import (
    bytes_moved,
    guided_ddpm_step,
    guided_ddpm_step_reference,
    make_inputs,
)

from benchmarks.common import (
    maybe_compile,
    op_speed_test,
    timed_callable,
)
from benchmarks.kernel_variants import variant_main

OP = "guided_ddpm_step"
MODES = ("fwd",)
TRITON_PROVIDERS = ("triton",)


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
        if interpreter_active():
            set_provider("triton")  # CPU smoke run: the interpreter stands in for the GPU
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
    op_speed_test(sys.modules[__name__], benchmark, provider, "fwd")


def main(argv: list[str] | None = None) -> list[dict]:
    return variant_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
