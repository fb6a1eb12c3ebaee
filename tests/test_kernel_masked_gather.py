"""masked_gather: Triton kernel vs fp64 reference (forward and every gradient), and the CPU dispatch path.

Kernel tests are marked `interpreter`: run them with `TRITON_INTERPRET=1 pytest -m interpreter` (or CUDA).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dream_fast.kernels.masked_gather import make_inputs, masked_gather, masked_gather_reference
from kernel_checks import assert_flash_rule, cast_inputs, run_with_grads

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
    B, L, C, D, S, K = shape
    base = make_inputs("cpu", torch.float64, B=B, L=L, C=C, D=D, S=S, K=K, seed=B * 100 + S * 10 + K)
    dy = torch.randn(B, S + K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    base = cast_inputs(base, dtype, "cpu")  # round once: the fp64 reference sees the same inputs
    dy = dy.to(dtype).double()
    out64, g64 = run_with_grads(masked_gather_reference, cast_inputs(base, torch.float64, "cpu"), dy, GRAD_NAMES)
    out_lo, g_lo = run_with_grads(masked_gather_reference, cast_inputs(base, dtype, "cpu"), dy, GRAD_NAMES)
    out_k, g_k = run_with_grads(
        masked_gather, cast_inputs(base, dtype, kernel_device), dy.to(kernel_device), GRAD_NAMES
    )

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
