"""The accuracy rule every fused kernel is held to, in one place (FlashAttention's): against an fp64
evaluation of the reference on the same (already rounded) inputs,

    |kernel - fp64|max  <=  2 * |reference in the kernel's dtype - fp64|max  +  floor * max(1, |fp64|max)

i.e. a kernel may be at most twice as far from the exact result as PyTorch's own computation in the
same precision; `floor` (about an ulp of the dtype, relative to the output's magnitude) keeps ties from
tripping it. Used by the kernel tests (tests/kernel_checks.py) and the GPU suite's correctness steps.
"""

from __future__ import annotations

import torch


def kernel_errors(got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """(kernel error, reference error, output scale) against `exact` (fp64), as max-abs differences."""
    if exact.numel() == 0:
        return 0.0, 0.0, 1.0
    exact = exact.double().cpu()
    err_k = (got.double().cpu() - exact).abs().max().item()
    err_r = (low.double().cpu() - exact).abs().max().item()
    return err_k, err_r, max(1.0, exact.abs().max().item())


def within_rule(got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, floor: float) -> tuple[bool, float, float]:
    """(passes, kernel error, reference error); a non-finite kernel output never passes."""
    err_k, err_r, scale = kernel_errors(got, low, exact)
    finite = bool(torch.isfinite(got).all()) if got.numel() else True
    return finite and err_k <= 2 * err_r + floor * scale, err_k, err_r


def assert_within_rule(name: str, got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, floor: float) -> None:
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the kernel output (unwritten element?)"
    ok, err_k, err_r = within_rule(got, low, exact, floor)
    assert ok, f"{name}: kernel err {err_k:.3e} > 2 x reference err {err_r:.3e} + floor {floor:.1e} (x scale)"
