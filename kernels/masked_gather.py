"""Fused encoder input: z_proj of the kept tokens + buffer + pos-emb + LayerNorm (DESIGN §1.2).

Triton kernel, its launcher and autograd Function, and the PyTorch reference; `masked_gather`
picks one through `dream_fast.kernels.dispatch.use_triton`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from dream_fast.kernels.dispatch import use_triton

__all__ = ["masked_gather", "masked_gather_reference", "make_inputs", "bytes_moved"]


def _alloc(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # DREAM_KERNELS_POISON=1 (tests) fills outputs with NaN so any element the kernel forgets fails.
    if os.environ.get("DREAM_KERNELS_POISON", "0") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _masked_gather_rows(
    b,
    rows,
    tok_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    buf_ptr,
    L,
    C,
    D,
    S,
    K,
    offs_d,
    mask_d,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pre-norm rows x (BLOCK_R, BLOCK_D) in fp32, plus what the backward needs to route grads."""
    valid = rows < S + K
    is_buf = rows < S
    is_tok = valid & (rows >= S)
    k = tl.maximum(rows - S, 0)
    idx = tl.load(idx_ptr + b * K + k, mask=is_tok, other=0).to(tl.int64)
    pos_row = tl.where(is_tok, S + idx, rows)
    tok_base = tok_ptr + b * L * C + idx * C  # (BLOCK_R,) pointers to the kept token rows
    m2 = valid[:, None] & mask_d[None, :]

    # C is small (16-48): an fp32 outer-product loop beats a padded tl.dot and stays exact.
    proj = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for c in range(0, C):
        t_c = tl.load(tok_base + c, mask=is_tok, other=0.0).to(tl.float32)
        w_c = tl.load(w_ptr + offs_d * C + c, mask=mask_d, other=0.0).to(tl.float32)
        proj += t_c[:, None] * w_c[None, :]
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    buf = tl.load(
        buf_ptr + rows[:, None] * D + offs_d[None, :], mask=is_buf[:, None] & mask_d[None, :], other=0.0
    ).to(tl.float32)
    pos = tl.load(pos_ptr + pos_row[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    x = tl.where(is_tok[:, None], proj + bias[None, :], buf) + pos
    x = tl.where(m2, x, 0.0)
    return x, valid, is_tok, idx, pos_row, tok_base


@triton.jit
def _masked_gather_fwd_kernel(
    tok_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    buf_ptr,
    lnw_ptr,
    lnb_ptr,
    out_ptr,
    L,
    C,
    D,
    S,
    K,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x, valid, is_tok, idx, pos_row, tok_base = _masked_gather_rows(
        b,
        rows,
        tok_ptr,
        idx_ptr,
        w_ptr,
        bias_ptr,
        pos_ptr,
        buf_ptr,
        L,
        C,
        D,
        S,
        K,
        offs_d,
        mask_d,
        BLOCK_R,
        BLOCK_D,
    )
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    lnw = tl.load(lnw_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * lnw[None, :] + lnb[None, :]
    out_offs = (b * (S + K) + rows)[:, None] * D + offs_d[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=valid[:, None] & mask_d[None, :])


@triton.jit
def _masked_gather_bwd_kernel(
    tok_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    buf_ptr,
    lnw_ptr,
    dy_ptr,
    dtok_ptr,
    dw_ptr,
    dbias_ptr,
    dpos_ptr,
    dlnw_ptr,
    dlnb_ptr,
    L,
    C,
    D,
    S,
    K,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    # Recompute x and the LN statistics instead of storing them: C is tiny, memory is not.
    x, valid, is_tok, idx, pos_row, tok_base = _masked_gather_rows(
        b,
        rows,
        tok_ptr,
        idx_ptr,
        w_ptr,
        bias_ptr,
        pos_ptr,
        buf_ptr,
        L,
        C,
        D,
        S,
        K,
        offs_d,
        mask_d,
        BLOCK_R,
        BLOCK_D,
    )
    m2 = valid[:, None] & mask_d[None, :]
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    dy = tl.load(dy_ptr + (b * (S + K) + rows)[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
    dy = dy.to(tl.float32)
    lnw = tl.load(lnw_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    tl.atomic_add(dlnw_ptr + offs_d, tl.sum(dy * xhat, axis=0), mask=mask_d)
    tl.atomic_add(dlnb_ptr + offs_d, tl.sum(dy, axis=0), mask=mask_d)

    dxhat = dy * lnw[None, :]
    c1 = tl.sum(dxhat, axis=1) / D
    c2 = tl.sum(dxhat * xhat, axis=1) / D
    dx = tl.where(m2, (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None], 0.0)

    # Different batch rows hit the same pos row: atomics. Buffer rows own pos rows [0, S), so the
    # buffer gradient is read back from dpos[:S] by the launcher.
    tl.atomic_add(dpos_ptr + pos_row[:, None] * D + offs_d[None, :], dx, mask=m2)
    dx_tok = tl.where(is_tok[:, None], dx, 0.0)
    tl.atomic_add(dbias_ptr + offs_d, tl.sum(dx_tok, axis=0), mask=mask_d)
    for c in range(0, C):
        w_c = tl.load(w_ptr + offs_d * C + c, mask=mask_d, other=0.0).to(tl.float32)
        t_c = tl.load(tok_base + c, mask=is_tok, other=0.0).to(tl.float32)
        # keep_idx rows are duplicate-free, so each (b, idx) token row is written by one program.
        dt_c = tl.sum(dx_tok * w_c[None, :], axis=1)
        tl.store(dtok_ptr + b * L * C + idx * C + c, dt_c.to(dtok_ptr.dtype.element_ty), mask=is_tok)
        tl.atomic_add(dw_ptr + offs_d * C + c, tl.sum(dx_tok * t_c[:, None], axis=0), mask=mask_d)


# ----------------------------------------------------------------------------- launchers
def _blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 16))
    # ~4K fp32 elements per (rows x D) tile keeps registers in check at D = 768-1664.
    block_r = max(1, min(16, 4096 // block_d))
    return block_r, block_d


def masked_gather_forward(
    tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, ln_bias_D, eps: float
) -> torch.Tensor:
    B, L, C = tokens_BLC.shape
    K = keep_idx_BK.shape[1]
    S, D = buffer_SD.shape
    out = _alloc((B, S + K, D), tokens_BLC, tokens_BLC.dtype)
    if out.numel() == 0:
        return out
    block_r, block_d = _blocks(D)
    grid = (B, triton.cdiv(S + K, block_r))
    _masked_gather_fwd_kernel[grid](
        tokens_BLC,
        keep_idx_BK,
        weight_DC,
        bias_D,
        pos_PD,
        buffer_SD,
        ln_weight_D,
        ln_bias_D,
        out,
        L,
        C,
        D,
        S,
        K,
        float(eps),  # eps as a Python float: a compiled caller would promote it
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return out


def masked_gather_backward(
    dy_BRD, tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, eps: float
) -> tuple[torch.Tensor, ...]:
    """Returns fp32 grads (tokens, weight, bias, pos, buffer, ln_weight, ln_bias); caller casts."""
    B, L, C = tokens_BLC.shape
    K = keep_idx_BK.shape[1]
    S, D = buffer_SD.shape
    dev = tokens_BLC.device
    f32 = dict(device=dev, dtype=torch.float32)
    # Unkept token rows get no contribution: zeros, never poisoned.
    dtok = torch.zeros((B, L, C), device=dev, dtype=tokens_BLC.dtype)
    dw, dbias = torch.zeros((D, C), **f32), torch.zeros(D, **f32)
    dpos, dlnw, dlnb = torch.zeros(pos_PD.shape, **f32), torch.zeros(D, **f32), torch.zeros(D, **f32)
    if B * (S + K) > 0:
        block_r, block_d = _blocks(D)
        grid = (B, triton.cdiv(S + K, block_r))
        _masked_gather_bwd_kernel[grid](
            tokens_BLC,
            keep_idx_BK,
            weight_DC,
            bias_D,
            pos_PD,
            buffer_SD,
            ln_weight_D,
            dy_BRD.contiguous(),
            dtok,
            dw,
            dbias,
            dpos,
            dlnw,
            dlnb,
            L,
            C,
            D,
            S,
            K,
            float(eps),
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )
    return dtok, dw, dbias, dpos, dpos[:S].clone(), dlnw, dlnb


class MaskedGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, keep_idx, weight, bias, pos, buffer, ln_weight, ln_bias, eps):
        tensors = [t.contiguous() for t in (tokens, keep_idx, weight, bias, pos, buffer, ln_weight, ln_bias)]
        ctx.save_for_backward(*tensors[:7])
        ctx.eps = eps
        ctx.ln_bias_dtype = ln_bias.dtype
        return masked_gather_forward(*tensors, eps)

    @staticmethod
    def backward(ctx, dy):
        tokens, keep_idx, weight, bias, pos, buffer, ln_weight = ctx.saved_tensors
        dtok, dw, dbias, dpos, dbuf, dlnw, dlnb = masked_gather_backward(
            dy, tokens, keep_idx, weight, bias, pos, buffer, ln_weight, ctx.eps
        )
        grads = (
            dtok,
            None,
            dw.to(weight.dtype),
            dbias.to(bias.dtype),
            dpos.to(pos.dtype),
            dbuf.to(buffer.dtype),
            dlnw.to(ln_weight.dtype),
            dlnb.to(ctx.ln_bias_dtype),
        )
        return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad)], None)


# ----------------------------------------------------------------------------- reference and API
def masked_gather_reference(
    tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, ln_bias_D, eps: float = 1e-6
) -> torch.Tensor:
    """Plain PyTorch version of `masked_gather` (autograd gives its backward)."""
    B, L, C = tokens_BLC.shape
    S, D = buffer_SD.shape
    dt = tokens_BLC.dtype
    tok_BKC = torch.gather(tokens_BLC, 1, keep_idx_BK[..., None].expand(-1, -1, C))
    pos_tok_BKD = pos_PD[S:].to(dt)[keep_idx_BK]
    x_tok = F.linear(tok_BKC, weight_DC.to(dt), bias_D.to(dt)) + pos_tok_BKD
    x_buf = (buffer_SD.to(dt) + pos_PD[:S].to(dt)).expand(B, S, D)
    x = torch.cat([x_buf, x_tok], dim=1)
    return F.layer_norm(x, (D,), ln_weight_D.to(dt), ln_bias_D.to(dt), eps)


def _check(
    tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, ln_bias_D, validate: bool
) -> None:
    if tokens_BLC.dim() != 3:
        raise ValueError(f"tokens_BLC must be (B, L, C), got shape {tuple(tokens_BLC.shape)}")
    B, L, C = tokens_BLC.shape
    if buffer_SD.dim() != 2:
        raise ValueError(f"buffer_SD must be (S, D) (S may be 0), got shape {tuple(buffer_SD.shape)}")
    S, D = buffer_SD.shape
    if keep_idx_BK.dtype != torch.int64 or keep_idx_BK.dim() != 2 or keep_idx_BK.shape[0] != B:
        raise ValueError(
            f"keep_idx_BK must be int64 of shape ({B}, K), got {keep_idx_BK.dtype} {tuple(keep_idx_BK.shape)}"
        )
    if keep_idx_BK.shape[1] > L:
        raise ValueError(f"keep_idx_BK keeps {keep_idx_BK.shape[1]} tokens but there are only L={L}")
    for name, t, want in (
        ("weight_DC", weight_DC, (D, C)),
        ("bias_D", bias_D, (D,)),
        ("pos_PD", pos_PD, (S + L, D)),
        ("ln_weight_D", ln_weight_D, (D,)),
        ("ln_bias_D", ln_bias_D, (D,)),
    ):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} must have shape {want} (S={S}, L={L}, C={C}, D={D}), got {tuple(t.shape)}"
            )
    if validate and keep_idx_BK.numel():
        # Host-syncing checks, off by default: the kernel relies on both for exact gradients.
        if int(keep_idx_BK.min()) < 0 or int(keep_idx_BK.max()) >= L:
            raise ValueError(f"keep_idx_BK values must lie in [0, {L})")
        srt = keep_idx_BK.sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("keep_idx_BK rows must be duplicate-free (a slice of a permutation)")


def masked_gather(
    tokens_BLC: torch.Tensor,
    keep_idx_BK: torch.Tensor,
    weight_DC: torch.Tensor,
    bias_D: torch.Tensor,
    pos_PD: torch.Tensor,
    buffer_SD: torch.Tensor,
    ln_weight_D: torch.Tensor,
    ln_bias_D: torch.Tensor,
    eps: float = 1e-6,
    validate: bool = False,
) -> torch.Tensor:
    """Encoder input rows for the buffer and the kept tokens only, shape (B, S+K, D).

    With S = buffer_SD.shape[0] (may be 0), P = S + L pos-emb rows and LN the LayerNorm over D
    (affine ln_weight/ln_bias, `eps`):

        out[b, j]     = LN(buffer[j] + pos[j])                                      j < S
        out[b, S + k] = LN(tokens[b, i] @ weight.T + bias + pos[S + i]),  i = keep_idx[b, k]

    i.e. z_proj -> prepend buffer -> + pos-emb -> LayerNorm -> drop masked tokens, computed in the
    cheap order (masked tokens are never projected). keep_idx_BK is int64 (B, K), 0 <= K <= L,
    and each row must be duplicate-free (a slice of a random permutation): the Triton backward
    writes each token's gradient once, so duplicates would lose gradient. Pass validate=True to
    check range and distinctness (host sync). Output dtype = tokens dtype; params are cast to it
    (reference) or read in fp32 (kernel).
    """
    _check(tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, ln_bias_D, validate)
    tensors = (tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, ln_bias_D)
    if use_triton(*tensors):
        return MaskedGatherFunction.apply(*tensors, eps)
    return masked_gather_reference(*tensors, eps)


def make_inputs(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    B: int = 2,
    L: int = 37,
    C: int = 12,
    D: int = 80,
    S: int = 5,
    K: int = 20,
    seed: int = 0,
    requires_grad: bool = True,
) -> dict:
    """Random keyword arguments for `masked_gather` (benchmarks, tests, the GPU suite)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    keep = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B)]).to(device)
    return dict(
        tokens_BLC=rnd(B, L, C),
        keep_idx_BK=keep.reshape(B, K),
        weight_DC=rnd(D, C, scale=C**-0.5),
        bias_D=rnd(D, scale=0.1),
        pos_PD=rnd(S + L, D, scale=0.5),
        buffer_SD=rnd(S, D, scale=0.5),
        ln_weight_D=rnd(D, scale=0.2).detach().add_(1.0).requires_grad_(requires_grad),
        ln_bias_D=rnd(D, scale=0.1),
        eps=1e-6,
    )


def bytes_moved(
    tokens_BLC,
    keep_idx_BK,
    weight_DC,
    bias_D,
    pos_PD,
    buffer_SD,
    ln_weight_D,
    ln_bias_D,
    eps: float = 1e-6,
    **_,
) -> int:
    """Forward HBM bytes of the fused kernel: kept token rows, their pos rows, indices, params, output."""
    B, _, C = tokens_BLC.shape
    K = keep_idx_BK.shape[1]
    S, D = buffer_SD.shape
    e = tokens_BLC.element_size()
    return (
        B * K * C * e
        + keep_idx_BK.numel() * 8
        + pos_PD.numel() * pos_PD.element_size()
        + (weight_DC.numel() + buffer_SD.numel() + 3 * D) * weight_DC.element_size()
        + B * (S + K) * D * e
    )
