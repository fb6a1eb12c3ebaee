"""decoder_fill: Triton kernel vs fp64 reference (forward and every gradient), and the CPU dispatch path.

Kernel tests are marked `interpreter`: run them with `TRITON_INTERPRET=1 pytest -m interpreter` (or CUDA).
"""

from __future__ import annotations

import pytest
import torch
from dream_fast.kernels.decoder_fill import (
    _BLOCK_R,
    batch_chunks,
    decoder_fill,
    decoder_fill_reference,
    make_inputs,
    source_rows,
)
from kernel_checks import assert_flash_rule, cast_inputs, forbid_atomics, run_with_grads

GRAD_NAMES = ["h_BSKD", "mask_token_D", "pos_PD"]
# (B, L, D, S, K): non-powers of two, batch 1 and 3, no buffer, all visible, K=1, K=0.
SHAPES = [
    (1, 37, 80, 5, 20),
    (3, 37, 80, 5, 37),
    (3, 37, 80, 5, 1),
    (3, 37, 80, 0, 20),
    (3, 37, 80, 5, 0),
    (2, 37, 200, 5, 11),  # D spans two 128-wide D blocks
    (5, 37, 80, 5, 20),  # parallel backward: two batch chunks of 3 + 2 rows (ragged last chunk)
]


def _check_against_reference(shape, dtype, kernel_device, variant="parallel"):
    B, L, D, S, K = shape
    base = make_inputs("cpu", torch.float64, B=B, L=L, D=D, S=S, K=K, seed=B * 100 + S * 10 + K)
    dy = torch.randn(B, S + L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    base = cast_inputs(base, dtype, "cpu")  # round once: the fp64 reference sees the same inputs
    dy = dy.to(dtype).double()
    out64, g64 = run_with_grads(decoder_fill_reference, cast_inputs(base, torch.float64, "cpu"), dy, GRAD_NAMES)
    out_lo, g_lo = run_with_grads(decoder_fill_reference, cast_inputs(base, dtype, "cpu"), dy, GRAD_NAMES)
    kin = {**cast_inputs(base, dtype, kernel_device), "variant": variant}
    out_k, g_k = run_with_grads(decoder_fill, kin, dy.to(kernel_device), GRAD_NAMES)

    assert out_k.shape == (B, S + L, D) and out_k.dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert_flash_rule("out", out_k, out_lo, out64, floor)
    for n in GRAD_NAMES:
        assert g_k[n].dtype == dtype, f"grad of {n} has dtype {g_k[n].dtype}"
        assert_flash_rule(f"grad {n}", g_k[n], g_lo[n], g64[n], floor)
    return g_k


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_D{}_S{}_K{}".format(*s))
def test_kernel_matches_reference(shape, dtype, kernel_device, force_triton):
    _check_against_reference(shape, dtype, kernel_device)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[-1]], ids=["B3_allvisible", "B5"])
def test_kernel_serial_variant_matches_reference(shape, kernel_device, force_triton):
    """The one-chunk backward (the kernel's order before the batch split) stays correct."""
    _check_against_reference(shape, torch.float32, kernel_device, variant="serial")


@pytest.mark.interpreter
def test_backward_is_bitwise_reproducible_and_parallel_over_batch(kernel_device, force_triton, monkeypatch):
    """Two backward runs give identical bits (no atomics, in any mode), and the parallel variant
    really splits the batch: the serial variant's gradients to fp32 rounding of the sum order."""
    if kernel_device == "cpu":
        forbid_atomics(monkeypatch)
    B, L, D, S, K = 5, 37, 80, 5, 20
    tiles = triton_cdiv(S + L, _BLOCK_R)  # one D tile at D = 80
    assert batch_chunks(B, tiles, torch.device(kernel_device)) > 1, "test shape must use several chunks"
    runs = [_check_against_reference((B, L, D, S, K), torch.float32, kernel_device) for _ in range(2)]
    for n in GRAD_NAMES:
        assert torch.equal(runs[0][n], runs[1][n]), f"grad {n} differs between two identical runs"
    serial = _check_against_reference((B, L, D, S, K), torch.float32, kernel_device, variant="serial")
    for n in GRAD_NAMES:  # summation order differs: fp32 rounding relative to the largest entry
        scale = max(1.0, float(serial[n].abs().max()))
        torch.testing.assert_close(runs[0][n], serial[n], rtol=0, atol=1e-6 * scale, msg=n)


@pytest.mark.interpreter
def test_kernel_rejects_duplicate_keep_idx_on_cpu(kernel_device, force_triton):
    """On CPU tensors the distinctness check costs no sync, so the Triton path always runs it."""
    if kernel_device != "cpu":
        pytest.skip("the always-on check is for CPU tensors; on CUDA it is validate=True")
    inputs = make_inputs("cpu", torch.float32, B=2, L=10, D=8, S=2, K=5)
    inputs["keep_idx_BK"][1, 2] = inputs["keep_idx_BK"][1, 0]
    with pytest.raises(ValueError, match="row 1 repeats an index"):
        decoder_fill(**inputs)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- CPU dispatch path
def _naive(h, keep, mask_token, pos, L):
    """Position-by-position loop written straight from decoder_fill's docstring."""
    B, SK, D = h.shape
    K = keep.shape[1]
    S = SK - K
    out = []
    for b in range(B):
        rows = [h[b, j] + pos[j] for j in range(S)]
        where = {int(keep[b, k]): k for k in range(K)}
        for p in range(L):
            src = h[b, S + where[p]] if p in where else mask_token
            rows.append(src + pos[S + p])
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("S,K", [(5, 11), (0, 37), (3, 0)])
def test_cpu_dispatch_runs_reference_and_matches_naive_loop(S, K, monkeypatch):
    monkeypatch.delenv("DREAM_KERNELS", raising=False)
    inputs = make_inputs("cpu", torch.float64, B=2, L=37, D=24, S=S, K=K, seed=5)
    out = decoder_fill(**inputs)  # CPU tensors + auto provider -> reference
    assert "DecoderFill" not in type(out.grad_fn).__name__
    naive_in = {
        k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    expect = _naive(*naive_in.values())
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    dy = torch.randn_like(out)
    out.backward(dy)
    expect.backward(dy)
    for n in GRAD_NAMES:
        got, want = inputs[n].grad, naive_in[n].grad
        if want is None:  # all visible: the mask token is never used
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=n)


def test_source_rows_inverts_keep_idx():
    keep = torch.tensor([[4, 0, 2], [1, 3, 5]])
    src = source_rows(keep, 6)
    assert src.tolist() == [[1, -1, 2, -1, 0, -1], [-1, 0, -1, 1, -1, 2]]


def test_bad_inputs_raise_clear_errors():
    inputs = make_inputs("cpu", torch.float32, B=2, L=10, D=8, S=2, K=5, requires_grad=False)
    with pytest.raises(ValueError, match="int64"):
        decoder_fill(**{**inputs, "keep_idx_BK": inputs["keep_idx_BK"].int()})
    with pytest.raises(ValueError, match="pos_PD"):
        decoder_fill(**{**inputs, "pos_PD": inputs["pos_PD"][:-1]})
    with pytest.raises(ValueError, match="mask_token_D"):
        decoder_fill(**{**inputs, "mask_token_D": inputs["mask_token_D"][:-1]})
    dup = inputs["keep_idx_BK"].clone()
    dup[1, 2] = dup[1, 0]
    with pytest.raises(ValueError, match="duplicate-free"):
        decoder_fill(**{**inputs, "keep_idx_BK": dup}, validate=True)
    with pytest.raises(ValueError, match="variant 'fast' unknown"):
        decoder_fill(**inputs, variant="fast")
