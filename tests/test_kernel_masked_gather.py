"""masked_gather: Triton kernel vs fp64 reference (forward and every gradient), and the CPU dispatch path.

Kernel tests are marked `interpreter`: run them with `TRITON_INTERPRET=1 pytest -m interpreter` (or CUDA).
"""

from __future__ import annotations

import dream_fast.kernels.masked_gather as mg
import pytest
import torch
import torch.nn.functional as F
from dream_fast.kernels.masked_gather import make_inputs, masked_gather, masked_gather_reference
from kernel_checks import assert_flash_rule, cast_inputs, forbid_atomics, run_with_grads

GRAD_NAMES = ["tokens_BLC", "weight_DC", "bias_D", "pos_PD", "buffer_SD", "ln_weight_D", "ln_bias_D"]
# (B, L, C, D, S, K): non-powers of two, batch 1 and 3, no buffer, all visible, K=1, K=0.
SHAPES = [
    (1, 37, 12, 80, 5, 20),
    (3, 37, 12, 80, 5, 37),
    (3, 37, 12, 80, 5, 1),
    (3, 37, 12, 80, 0, 20),
    (3, 37, 12, 80, 5, 0),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_L{}_C{}_D{}_S{}_K{}".format(*s))
def test_kernel_matches_reference(shape, dtype, kernel_device, force_triton):
    _check_against_reference(shape, dtype, kernel_device)


def _check_against_reference(shape, dtype, kernel_device, variant="multirow"):
    B, L, C, D, S, K = shape
    base = make_inputs("cpu", torch.float64, B=B, L=L, C=C, D=D, S=S, K=K, seed=B * 100 + S * 10 + K)
    dy = torch.randn(B, S + K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    base = cast_inputs(base, dtype, "cpu")  # round once: the fp64 reference sees the same inputs
    dy = dy.to(dtype).double()
    out64, g64 = run_with_grads(masked_gather_reference, cast_inputs(base, torch.float64, "cpu"), dy, GRAD_NAMES)
    out_lo, g_lo = run_with_grads(masked_gather_reference, cast_inputs(base, dtype, "cpu"), dy, GRAD_NAMES)
    kin = {**cast_inputs(base, dtype, kernel_device), "variant": variant}
    out_k, g_k = run_with_grads(masked_gather, kin, dy.to(kernel_device), GRAD_NAMES)

    assert out_k.shape == (B, S + K, D) and out_k.dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert_flash_rule("out", out_k, out_lo, out64, floor)
    for n in GRAD_NAMES:
        assert g_k[n].dtype == dtype, f"grad of {n} has dtype {g_k[n].dtype}"
        assert_flash_rule(f"grad {n}", g_k[n], g_lo[n], g64[n], floor)
    if K < L:  # unkept tokens get exactly zero gradient
        unkept = torch.ones(B, L, dtype=torch.bool)
        unkept.scatter_(1, base["keep_idx_BK"], False)
        assert (g_k["tokens_BLC"].cpu()[unkept] == 0).all()
    return g_k


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]], ids=["B1", "B3_allvisible"])
def test_kernel_baseline_variant_matches_reference(shape, kernel_device, force_triton):
    """One register tile per program (the kernel before BLOCK_ROWS) stays correct."""
    _check_against_reference(shape, torch.float32, kernel_device, variant="baseline")


@pytest.fixture
def no_atomics(monkeypatch):
    forbid_atomics(monkeypatch)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "shape,dtype",
    [(SHAPES[3], torch.bfloat16), (SHAPES[4], torch.float32)],  # B3_allvisible-fp32: below
    ids=["S0-bf16", "K0-fp32"],
)
def test_deterministic_backward_matches_reference_without_atomics(
    shape, dtype, kernel_device, force_triton, monkeypatch, no_atomics
):
    monkeypatch.setenv("DREAM_FAST_DETERMINISTIC", "1")
    _check_against_reference(shape, dtype, kernel_device)


@pytest.mark.interpreter
def test_deterministic_backward_is_bitwise_reproducible(kernel_device, force_triton, monkeypatch):
    """Deterministic mode: no atomic runs, two backward runs give identical bits, and they match
    the atomic path to fp32 rounding."""
    monkeypatch.setenv("DREAM_FAST_DETERMINISTIC", "1")
    with pytest.MonkeyPatch.context() as mp:
        forbid_atomics(mp)
        runs = [_check_against_reference(SHAPES[1], torch.float32, kernel_device) for _ in range(2)]
    for n in GRAD_NAMES:
        assert torch.equal(runs[0][n], runs[1][n]), f"grad {n} differs between two identical runs"
    monkeypatch.setenv("DREAM_FAST_DETERMINISTIC", "0")
    if kernel_device == "cpu":  # the guard bites: the default mode does use atomics
        with pytest.raises(Exception, match="atomic-free"), pytest.MonkeyPatch.context() as mp:
            forbid_atomics(mp)
            _check_against_reference(SHAPES[1], torch.float32, kernel_device)
    atomic = _check_against_reference(SHAPES[1], torch.float32, kernel_device)
    for n in GRAD_NAMES:  # summation order differs: fp32 rounding relative to the largest entry
        scale = max(1.0, float(atomic[n].abs().max()))
        torch.testing.assert_close(runs[0][n], atomic[n], rtol=0, atol=1e-6 * scale, msg=n)


def test_deterministic_switch_precedence(monkeypatch):
    """The switch itself: env wins over set_deterministic, which wins over torch's flag."""
    from dream_fast import kernels

    monkeypatch.delenv("DREAM_FAST_DETERMINISTIC", raising=False)
    kernels.set_deterministic(None)
    assert kernels.deterministic() is torch.are_deterministic_algorithms_enabled()
    try:
        kernels.set_deterministic(True)
        assert kernels.deterministic()
        monkeypatch.setenv("DREAM_FAST_DETERMINISTIC", "0")
        assert not kernels.deterministic()
        monkeypatch.setenv("DREAM_FAST_DETERMINISTIC", "maybe")
        with pytest.raises(ValueError, match="DREAM_FAST_DETERMINISTIC='maybe' unknown"):
            kernels.deterministic()
    finally:
        kernels.set_deterministic(None)


def test_rows_per_program_chosen_by_size():
    """DREAM-B training (64 images, 64 buffer + 256 kept rows, D = 768) packs 4 register tiles
    per program on a 132-SM GPU (what `meta` tensors assume); a batch-1 sampling step keeps one
    tile (its few programs)."""
    cuda = torch.device("meta")
    assert mg.block_rows(64, 64 + 256, 768, cuda) == (4, 16, 1024)
    assert mg.block_rows(64, 64 + 256, 1280, cuda) == (2, 16, 2048)  # DREAM-H: 2-row tiles, 8 per program
    assert mg.block_rows(1, 64 + 16, 768, cuda) == (4, 4, 1024)
    assert mg.block_rows(64, 320, 768, cuda, variant="baseline") == (4, 4, 1024)


@pytest.mark.interpreter
def test_kernel_rejects_duplicate_keep_idx_on_cpu(kernel_device, force_triton):
    """On CPU tensors the distinctness check costs no sync, so the Triton path always runs it."""
    if kernel_device != "cpu":
        pytest.skip("the always-on check is for CPU tensors; on CUDA it is validate=True")
    inputs = make_inputs("cpu", torch.float32, B=2, L=10, C=4, D=16, S=2, K=5)
    inputs["keep_idx_BK"][0, 3] = inputs["keep_idx_BK"][0, 1]
    with pytest.raises(ValueError, match="row 0 repeats an index.*silently lose gradient"):
        masked_gather(**inputs)


# ----------------------------------------------------------------------------- CPU dispatch path
def _naive(tokens, keep, weight, bias, pos, buffer, lnw, lnb, eps):
    """Row-by-row loop written straight from the formula in masked_gather's docstring."""
    B, S = tokens.shape[0], buffer.shape[0]
    rows_b = []
    for b in range(B):
        rows = []
        for j in range(S):
            rows.append(buffer[j] + pos[j])
        for k in range(keep.shape[1]):
            i = int(keep[b, k])
            rows.append(weight @ tokens[b, i] + bias + pos[S + i])
        out = []
        for x in rows:
            mu = x.mean()
            var = ((x - mu) ** 2).mean()
            out.append((x - mu) / torch.sqrt(var + eps) * lnw + lnb)
        rows_b.append(torch.stack(out) if out else torch.zeros(0, buffer.shape[1], dtype=buffer.dtype))
    return torch.stack(rows_b)


@pytest.mark.parametrize("S,K", [(5, 11), (0, 37), (3, 0)])
def test_cpu_dispatch_runs_reference_and_matches_naive_loop(S, K, monkeypatch):
    monkeypatch.delenv("DREAM_KERNELS", raising=False)
    inputs = make_inputs("cpu", torch.float64, B=2, L=37, C=12, D=80, S=S, K=K, seed=3)
    out = masked_gather(**inputs)  # CPU tensors + auto provider -> reference
    assert out.grad_fn is not None and "MaskedGather" not in type(out.grad_fn).__name__
    naive_in = {
        k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    expect = _naive(*naive_in.values())
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(out)
    out.backward(dy)
    expect.backward(dy)
    for n in GRAD_NAMES:
        if naive_in[n].grad is None:  # e.g. no buffer / no kept token: no path to this input
            assert inputs[n].grad is None or not inputs[n].grad.any()
            continue
        torch.testing.assert_close(inputs[n].grad, naive_in[n].grad, rtol=1e-9, atol=1e-9, msg=n)


def test_reference_matches_dense_formula_when_all_visible():
    # With every token kept in order, the op is LN(cat(buffer, z_proj(tokens)) + pos).
    inputs = make_inputs("cpu", torch.float64, B=2, L=9, C=4, D=16, S=3, K=9, requires_grad=False)
    inputs["keep_idx_BK"] = torch.arange(9).expand(2, 9).contiguous()
    x = torch.cat(
        [
            inputs["buffer_SD"].expand(2, 3, 16),
            F.linear(inputs["tokens_BLC"], inputs["weight_DC"], inputs["bias_D"]),
        ],
        1,
    )
    dense = F.layer_norm(x + inputs["pos_PD"], (16,), inputs["ln_weight_D"], inputs["ln_bias_D"], 1e-6)
    torch.testing.assert_close(masked_gather_reference(**inputs), dense)


def test_bad_inputs_raise_clear_errors():
    inputs = make_inputs("cpu", torch.float32, B=2, L=10, C=4, D=16, S=2, K=5, requires_grad=False)
    with pytest.raises(ValueError, match="int64"):
        masked_gather(**{**inputs, "keep_idx_BK": inputs["keep_idx_BK"].int()})
    with pytest.raises(ValueError, match="pos_PD"):
        masked_gather(**{**inputs, "pos_PD": inputs["pos_PD"][:-1]})
    dup = inputs["keep_idx_BK"].clone()
    dup[0, 1] = dup[0, 0]
    masked_gather(**{**inputs, "keep_idx_BK": dup})  # not validated by default: no host sync
    with pytest.raises(ValueError, match="duplicate-free"):
        masked_gather(**{**inputs, "keep_idx_BK": dup}, validate=True)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        masked_gather(**{**inputs, "keep_idx_BK": dup.clamp(max=0) + 10}, validate=True)
    with pytest.raises(ValueError, match="variant 'fast' unknown"):
        masked_gather(**inputs, variant="fast")
