"""Helpers shared by the kernel tests: dtype casts, fwd+bwd runs, FlashAttention's error rule, and
a guard that fails any atomic the Triton interpreter runs (deterministic-mode tests)."""

from __future__ import annotations

import torch
from dream_fast.kernels.error_rule import assert_within_rule


def cast_inputs(inputs: dict, dtype: torch.dtype, device: str) -> dict:
    """Floating tensors -> fresh leaves of `dtype` on `device` (requiring grad); other tensors moved."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(device=device, dtype=dtype).requires_grad_(True)
        elif isinstance(v, torch.Tensor):
            v = v.to(device)
        out[k] = v
    return out


def run_with_grads(fn, inputs: dict, dy: torch.Tensor, grad_names: list[str]) -> tuple[torch.Tensor, dict]:
    out = fn(**inputs)
    out.backward(dy.to(out.dtype))
    return out.detach(), {n: inputs[n].grad for n in grad_names}


def assert_flash_rule(name: str, got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, floor: float) -> None:
    """FlashAttention's rule (dream_fast.kernels.error_rule): |kernel - fp64| <= 2 |reference - fp64| + floor."""
    assert_within_rule(name, got, low, exact, floor)


def forbid_atomics(monkeypatch) -> None:
    """Make every tl.atomic_* under the Triton interpreter raise: on CPU, where even atomics
    are sequential and bitwise reproducible, this is what proves a kernel path has none."""
    from triton.runtime import interpreter

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton atomic ran on a path that must be atomic-free")

    for name in ("create_atomic_rmw", "create_atomic_cas"):
        assert hasattr(interpreter.InterpreterBuilder, name), f"triton interpreter has no {name}"
        monkeypatch.setattr(interpreter.InterpreterBuilder, name, refuse)
