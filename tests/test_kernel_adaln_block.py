"""Tests of kernels/adaln_block.py: the Triton kernels against the reference (interpreter or CUDA),
and the public op's CPU path against a naive implementation written here from the formula.

Interpreter tests run in their own process: `TRITON_INTERPRET=1 pytest -m interpreter tests/...`;
tests/conftest.py skips them otherwise and provides `force_triton` (provider + NaN-poisoned outputs).
"""

from __future__ import annotations

import dream_fast.kernels.adaln_block as ab
import pytest
import torch
from dream_fast.kernels.error_rule import assert_within_rule
from kernel_checks import forbid_atomics

NAMES = [
    "x_NW",
    "y_NW",
    "ln_w_W",
    "ln_b_W",
    "mod_w_3WW",
    "mod_b_3W",
    "fc1_w_WW",
    "fc1_b_W",
    "fc2_w_WW",
    "fc2_b_W",
]
# Absolute floors of the FlashAttention rule, relative to the fp64 output's magnitude: about an
# ulp of the dtype, so a kernel as accurate as the reference never trips on rounding ties.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}


def assert_fa_close(name: str, got: torch.Tensor, ref_low: torch.Tensor, ref64: torch.Tensor, dtype) -> None:
    """Kernel error vs fp64 ≤ 2 × the low-precision reference's error + a tiny floor."""
    assert_within_rule(name, got, ref_low, ref64, FLOOR[dtype])


def _inputs(N: int, W: int, dtype, device, requires_grad=True, seed=0):
    return ab.make_inputs(device, dtype, N=N, W=W, requires_grad=requires_grad, seed=seed)


def _fwd_bwd(fn, inputs: dict, dout: torch.Tensor):
    out = fn(**inputs)
    grads = torch.autograd.grad(out, [inputs[n] for n in NAMES], dout.to(out.dtype))
    return out, grads


def _as(inputs: dict, dtype) -> dict:
    return {k: v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in inputs.items()}


# ----------------------------------------------------------------------------- kernels
@pytest.mark.interpreter
@pytest.mark.parametrize("variant", ab.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,W", [(1, 96), (7, 80), (33, 96)])
def test_kernel_forward_backward_match_reference(force_triton, kernel_device, N, W, dtype, variant):
    """(33, 96) at interpreter tiles: 3 x 3 GEMM tiles, so the grouped order has a ragged group."""
    inputs = _inputs(N, W, dtype, kernel_device, seed=N + W)
    dout = torch.randn(N, W, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    out, grads = _fwd_bwd(lambda **kw: ab.adaln_block(**kw, variant=variant), inputs, dout)
    ref_low, ref_low_grads = _fwd_bwd(ab.adaln_block_reference, _as(inputs, dtype), dout)
    ref64, ref64_grads = _fwd_bwd(ab.adaln_block_reference, _as(inputs, torch.float64), dout)
    assert out.dtype == dtype
    assert_fa_close("out", out, ref_low, ref64, dtype)
    for name, g, g_low, g64 in zip(NAMES, grads, ref_low_grads, ref64_grads):
        assert g.dtype == dtype, f"d{name} dtype {g.dtype}"
        assert_fa_close(f"d{name}", g, g_low, g64, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", ab.VARIANTS)
def test_kernel_inference_path_and_leading_dims(force_triton, kernel_device, variant):
    """No grad: the kernels skip the saved tensors (SAVE=False); (B, L, W) inputs are flattened."""
    inputs = _inputs(2 * 5, 80, torch.float32, kernel_device, requires_grad=False)
    inputs["x_NW"] = inputs["x_NW"].reshape(2, 5, 80)
    inputs["y_NW"] = inputs["y_NW"].reshape(2, 5, 80)
    with torch.no_grad():
        out = ab.adaln_block(**inputs, variant=variant)
    ref64 = ab.adaln_block_reference(**_as(inputs, torch.float64))
    assert out.shape == (2, 5, 80)
    assert_fa_close("out", out, ab.adaln_block_reference(**inputs), ref64, torch.float32)


@pytest.mark.interpreter
def test_kernel_layernorm_stats_survive_large_mean(force_triton, kernel_device):
    """The residual stream can drift far from zero; one-pass variance must not cancel."""
    inputs = _inputs(7, 96, torch.float32, kernel_device, requires_grad=False)
    inputs["x_NW"] = inputs["x_NW"] + 300.0
    with torch.no_grad():
        out = ab.adaln_block(**inputs)
    ref64 = ab.adaln_block_reference(**_as(inputs, torch.float64))
    assert_fa_close("out", out, ab.adaln_block_reference(**inputs), ref64, torch.float32)


@pytest.mark.interpreter
def test_kernel_gpu_tile_sizes_block_m_128(force_triton, kernel_device, monkeypatch):
    """The GPU tile sizes (BLOCK_M = 128 when N > 4096, GROUP_M = 8) under the interpreter: the
    path the training shapes take, at an odd N (two row blocks, the second ragged) and a W below
    one column block. The 4096-row threshold is lowered so the interpreter runs few programs."""
    monkeypatch.setenv("DREAM_KERNELS_TILES", "gpu")
    monkeypatch.setattr(ab, "_LARGE_N", 100)
    N, W = 130, 48
    assert ab._gemm_blocks(N, three_acc=False)["BLOCK_M"] == 128 and ab._group_m() == 8
    inputs = _inputs(N, W, torch.float32, kernel_device, seed=3)
    dout = torch.randn(N, W, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    out, grads = _fwd_bwd(ab.adaln_block, inputs, dout)
    ref_low, ref_low_grads = _fwd_bwd(ab.adaln_block_reference, _as(inputs, torch.float32), dout)
    ref64, ref64_grads = _fwd_bwd(ab.adaln_block_reference, _as(inputs, torch.float64), dout)
    assert_fa_close("out", out, ref_low, ref64, torch.float32)
    for name, g, g_low, g64 in zip(NAMES, grads, ref_low_grads, ref64_grads):
        assert_fa_close(f"d{name}", g, g_low, g64, torch.float32)


@pytest.mark.interpreter
def test_kernel_condition_in_another_dtype(force_triton, kernel_device):
    """fp32 y with fp16 x (an fp32 condition path beside half activations): y is cast to x's
    dtype before the kernels, and its gradient comes back in fp32."""
    inputs = _inputs(7, 80, torch.float16, kernel_device, seed=5)
    inputs["y_NW"] = inputs["y_NW"].detach().float().requires_grad_(True)
    dout = torch.randn(7, 80, generator=torch.Generator().manual_seed(4)).to(kernel_device)
    out, grads = _fwd_bwd(ab.adaln_block, inputs, dout)
    assert out.dtype == torch.float16 and grads[1].dtype == torch.float32
    half = {**inputs, "y_NW": inputs["y_NW"].detach().half().requires_grad_(True)}
    ref_low, ref_low_grads = _fwd_bwd(ab.adaln_block_reference, half, dout)
    ref64, ref64_grads = _fwd_bwd(ab.adaln_block_reference, _as(half, torch.float64), dout)
    assert_fa_close("out", out, ref_low, ref64, torch.float16)
    assert_fa_close("dy_NW", grads[1].half(), ref_low_grads[1], ref64_grads[1], torch.float16)


@pytest.mark.interpreter
def test_kernel_backward_bitwise_reproducible(force_triton, kernel_device, monkeypatch):
    """Deterministic mode: two backward runs are bitwise equal (the LN partials are reduced in
    a fixed order; the kernel has no atomics in any mode)."""
    monkeypatch.setenv("DREAM_FAST_DETERMINISTIC", "1")
    if kernel_device == "cpu":
        forbid_atomics(monkeypatch)
    inputs = _inputs(33, 80, torch.float32, kernel_device, seed=9)
    dout = torch.randn(33, 80, generator=torch.Generator().manual_seed(3)).to(kernel_device)
    first = _fwd_bwd(ab.adaln_block, inputs, dout)[1]
    second = _fwd_bwd(ab.adaln_block, inputs, dout)[1]
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"d{name} differs between two identical backward runs"


# ----------------------------------------------------------------------------- CPU path
def _naive(x, y, ln_w, ln_b, mod_w, mod_b, fc1_w, fc1_b, fc2_w, fc2_b, eps=1e-6):
    """The block written from docs/design.md §1.5 with elementary ops only."""
    W = x.shape[-1]
    silu = lambda t: t / (1 + torch.exp(-t))
    mod = silu(y) @ mod_w.T + mod_b
    shift, scale, gate = mod[..., :W], mod[..., W : 2 * W], mod[..., 2 * W :]
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    h = ((x - mu) / torch.sqrt(var + eps) * ln_w + ln_b) * (1 + scale) + shift
    h = silu(h @ fc1_w.T + fc1_b) @ fc2_w.T + fc2_b
    return x + gate * h


def test_cpu_dispatches_to_reference_and_matches_naive(monkeypatch):
    monkeypatch.delenv("DREAM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def no_kernel(*a, **k):
        raise AssertionError("the Triton path ran for CPU tensors")

    monkeypatch.setattr(ab.AdaLNBlockFunction, "apply", no_kernel)
    inputs = _inputs(9, 24, torch.float64, "cpu")
    out = ab.adaln_block(**inputs)
    torch.testing.assert_close(out, _naive(*[inputs[n] for n in NAMES]), rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert all(inputs[n].grad is not None and torch.isfinite(inputs[n].grad).all() for n in NAMES)


def test_zero_initialised_modulation_is_identity():
    """gate = 0 when mod_w and mod_b are zero (the paper's init): the block returns x exactly."""
    inputs = _inputs(5, 16, torch.float32, "cpu", requires_grad=False)
    inputs["mod_w_3WW"].zero_()
    inputs["mod_b_3W"].zero_()
    assert torch.equal(ab.adaln_block(**inputs), inputs["x_NW"])


def test_bad_weight_shape_names_the_argument():
    inputs = _inputs(3, 8, torch.float32, "cpu", requires_grad=False)
    inputs["mod_w_3WW"] = inputs["mod_w_3WW"][:16]
    with pytest.raises(ValueError, match=r"mod_w_3WW has shape \(16, 8\); expected \(24, 8\)"):
        ab.adaln_block(**inputs)


def test_unknown_variant_is_named():
    inputs = _inputs(3, 8, torch.float32, "cpu", requires_grad=False)
    with pytest.raises(ValueError, match=r"variant 'fast' unknown; allowed: \['baseline', 'grouped'\]"):
        ab.adaln_block(**inputs, variant="fast")
