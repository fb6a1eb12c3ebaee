"""Decoder input fill: kept rows back in place, mask token elsewhere, + decoder pos-emb (DESIGN §1.4).

Triton kernels, launchers and autograd Function beside the PyTorch reference; `decoder_fill`
picks one through `dream_fast.kernels.dispatch.use_triton`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from dream_fast.kernels.dispatch import use_triton

__all__ = ["decoder_fill", "decoder_fill_reference", "make_inputs", "bytes_moved", "source_rows"]


def _alloc(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # DREAM_KERNELS_POISON=1 (tests) fills outputs with NaN so any element the kernel forgets fails.
    if os.environ.get("DREAM_KERNELS_POISON", "0") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def source_rows(keep_idx_BK: torch.Tensor, L: int) -> torch.Tensor:
    """src_BL[b, p] = k if keep_idx[b, k] == p else -1: a device-side scatter, no host sync."""
    B, K = keep_idx_BK.shape
    src_BL = torch.full((B, L), -1, dtype=torch.int64, device=keep_idx_BK.device)
    ar = torch.arange(K, device=keep_idx_BK.device, dtype=torch.int64).expand(B, K)
    return src_BL.scatter_(1, keep_idx_BK, ar)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _decoder_fill_fwd_kernel(
    h_ptr,
    src_ptr,
    mask_ptr,
    pos_ptr,
    out_ptr,
    L,
    D,
    S,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows in [0, S+L)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    valid = rows < S + L
    is_tok = valid & (rows >= S)
    p = tl.maximum(rows - S, 0)
    src = tl.load(src_ptr + b * L + p, mask=is_tok, other=-1)
    # Buffer rows copy h row j; kept token rows read h row S+src; masked rows read no h at all.
    h_row = tl.where(is_tok, S + src, rows)
    from_h = valid & ((rows < S) | (src >= 0))
    m2 = valid[:, None] & mask_d[None, :]
    h = tl.load(
        h_ptr + (b * (S + K) + h_row)[:, None] * D + offs_d[None, :],
        mask=from_h[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)
    mtok = tl.load(mask_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    y = tl.where(from_h[:, None], h, mtok[None, :]) + pos
    tl.store(
        out_ptr + (b * (S + L) + rows)[:, None] * D + offs_d[None, :], y.to(out_ptr.dtype.element_ty), mask=m2
    )


@triton.jit
def _decoder_fill_bwd_kernel(
    dy_ptr,
    src_ptr,
    dh_ptr,
    dmask_ptr,
    dpos_ptr,
    B,
    L,
    D,
    S,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program owns a (rows x D-slice) tile of pos and walks the batch: the pos gradient is
    # summed in registers (no atomics), and dy is read exactly once.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    valid = rows < S + L
    is_tok = valid & (rows >= S)
    p = tl.maximum(rows - S, 0)
    m2 = valid[:, None] & mask_d[None, :]
    dpos = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    dmask = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b in range(0, B):
        # b * (S+L) is a row count (fits int32); adding the int64 `rows` widens before * D.
        dy = tl.load(dy_ptr + (b * (S + L) + rows)[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        dy = dy.to(tl.float32)
        dpos += dy
        src = tl.load(src_ptr + b * L + p, mask=is_tok, other=-1)
        to_h = valid & ((rows < S) | (src >= 0))
        h_row = tl.where(is_tok, S + src, rows)
        # keep_idx rows are duplicate-free, so every dh row has exactly one writer.
        tl.store(
            dh_ptr + (b * (S + K) + h_row)[:, None] * D + offs_d[None, :],
            dy.to(dh_ptr.dtype.element_ty),
            mask=to_h[:, None] & mask_d[None, :],
        )
        dmask += tl.sum(tl.where((is_tok & (src < 0))[:, None], dy, 0.0), axis=0)
    tl.store(dpos_ptr + rows[:, None] * D + offs_d[None, :], dpos, mask=m2)
    tl.atomic_add(dmask_ptr + offs_d, dmask, mask=mask_d)


# ----------------------------------------------------------------------------- launchers
_BLOCK_R, _BLOCK_D = 16, 128


def decoder_fill_forward(h_BSKD, src_BL, mask_token_D, pos_PD, L: int) -> torch.Tensor:
    B, SK, D = h_BSKD.shape
    K = SK - (pos_PD.shape[0] - L)
    S = SK - K
    out = _alloc((B, S + L, D), h_BSKD, h_BSKD.dtype)
    if out.numel() == 0:
        return out
    block_d = min(_BLOCK_D, triton.next_power_of_2(D))
    grid = (B, triton.cdiv(S + L, _BLOCK_R), triton.cdiv(D, block_d))
    _decoder_fill_fwd_kernel[grid](
        h_BSKD, src_BL, mask_token_D, pos_PD, out, L, D, S, K, BLOCK_R=_BLOCK_R, BLOCK_D=block_d
    )
    return out


def decoder_fill_backward(dy_BPD, src_BL, K: int, h_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Returns (grad_h in h's dtype, fp32 grad_mask_token, fp32 grad_pos)."""
    B, P, D = dy_BPD.shape
    L = src_BL.shape[1]
    S = P - L
    dh = _alloc((B, S + K, D), dy_BPD, h_dtype)
    dmask = torch.zeros(D, device=dy_BPD.device, dtype=torch.float32)
    dpos = _alloc((P, D), dy_BPD, torch.float32)
    if B == 0 or P * D == 0:
        return dh.zero_(), dmask, dpos.zero_()
    block_d = min(_BLOCK_D, triton.next_power_of_2(D))
    grid = (triton.cdiv(P, _BLOCK_R), triton.cdiv(D, block_d))
    _decoder_fill_bwd_kernel[grid](
        dy_BPD.contiguous(), src_BL, dh, dmask, dpos, B, L, D, S, K, BLOCK_R=_BLOCK_R, BLOCK_D=block_d
    )
    return dh, dmask, dpos


class DecoderFillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, keep_idx, mask_token, pos, L):
        src = source_rows(keep_idx, L)
        ctx.save_for_backward(src)
        ctx.K = keep_idx.shape[1]
        ctx.dtypes = (h.dtype, mask_token.dtype, pos.dtype)
        return decoder_fill_forward(h.contiguous(), src, mask_token.contiguous(), pos.contiguous(), L)

    @staticmethod
    def backward(ctx, dy):
        (src,) = ctx.saved_tensors
        h_dt, m_dt, p_dt = ctx.dtypes
        dh, dmask, dpos = decoder_fill_backward(dy, src, ctx.K, h_dt)
        grads = (dh, None, dmask.to(m_dt), dpos.to(p_dt), None)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


# ----------------------------------------------------------------------------- reference and API
def decoder_fill_reference(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L: int) -> torch.Tensor:
    """Plain PyTorch version of `decoder_fill` (autograd gives its backward)."""
    B, SK, D = h_BSKD.shape
    K = keep_idx_BK.shape[1]
    S = SK - K
    dt = h_BSKD.dtype
    tok_BLD = mask_token_D.to(dt).expand(B, L, D)
    tok_BLD = tok_BLD.scatter(1, keep_idx_BK[..., None].expand(B, K, D), h_BSKD[:, S:])
    return torch.cat([h_BSKD[:, :S], tok_BLD], dim=1) + pos_PD.to(dt)


def _check(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L: int, validate: bool) -> None:
    if h_BSKD.dim() != 3:
        raise ValueError(f"h_BSKD must be (B, S+K, D), got shape {tuple(h_BSKD.shape)}")
    B, SK, D = h_BSKD.shape
    if keep_idx_BK.dtype != torch.int64 or keep_idx_BK.dim() != 2 or keep_idx_BK.shape[0] != B:
        raise ValueError(
            f"keep_idx_BK must be int64 of shape ({B}, K), got {keep_idx_BK.dtype} {tuple(keep_idx_BK.shape)}"
        )
    K = keep_idx_BK.shape[1]
    if not 0 <= K <= L or K > SK:
        raise ValueError(f"keep_idx_BK has K={K} columns; need K <= L={L} and K <= h rows {SK}")
    S = SK - K
    if tuple(pos_PD.shape) != (S + L, D):
        raise ValueError(
            f"pos_PD must have shape (S+L, D) = ({S + L}, {D}) with S = h rows - K = {S}, "
            f"got {tuple(pos_PD.shape)}"
        )
    if tuple(mask_token_D.shape) != (D,):
        raise ValueError(f"mask_token_D must have shape ({D},), got {tuple(mask_token_D.shape)}")
    if validate and keep_idx_BK.numel():
        if int(keep_idx_BK.min()) < 0 or int(keep_idx_BK.max()) >= L:
            raise ValueError(f"keep_idx_BK values must lie in [0, {L})")
        srt = keep_idx_BK.sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("keep_idx_BK rows must be duplicate-free (a slice of a permutation)")


def decoder_fill(
    h_BSKD: torch.Tensor,
    keep_idx_BK: torch.Tensor,
    mask_token_D: torch.Tensor,
    pos_PD: torch.Tensor,
    L: int,
    validate: bool = False,
) -> torch.Tensor:
    """Full-length decoder input (B, S+L, D) from the encoder rows of the buffer and kept tokens.

    With K = keep_idx_BK.shape[1], S = h_BSKD.shape[1] - K (buffer rows) and p in [0, L):

        out[b, j]     = h[b, j] + pos[j]                                  j < S
        out[b, S + p] = h[b, S + k] + pos[S + p]     if keep_idx[b, k] == p
        out[b, S + p] = mask_token + pos[S + p]      if p is not kept

    Gradients: grad_h is a gather of grad_out at the kept positions, grad_mask_token the sum of
    grad_out over masked positions, grad_pos the batch sum of grad_out. keep_idx_BK is int64
    (B, K) with duplicate-free rows (a slice of a random permutation), 0 <= K <= L; validate=True
    checks range and distinctness (host sync). The source row of each output position is built on
    the device (a scatter of arange into a -1-filled (B, L) map), so no step syncs the host.
    """
    _check(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L, validate)
    if use_triton(h_BSKD, keep_idx_BK, mask_token_D, pos_PD):
        return DecoderFillFunction.apply(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L)
    return decoder_fill_reference(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L)


def make_inputs(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    B: int = 2,
    L: int = 37,
    D: int = 80,
    S: int = 5,
    K: int = 20,
    seed: int = 0,
    requires_grad: bool = True,
) -> dict:
    """Random keyword arguments for `decoder_fill` (benchmarks, tests, the GPU suite)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    keep = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B)]).reshape(B, K).to(device)
    return dict(h_BSKD=rnd(B, S + K, D), keep_idx_BK=keep, mask_token_D=rnd(D), pos_PD=rnd(S + L, D), L=L)


def bytes_moved(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L: int, **_) -> int:
    """Forward HBM bytes: h and the index map read, pos read once per batch row, output written."""
    B, SK, D = h_BSKD.shape
    S = SK - keep_idx_BK.shape[1]
    e = h_BSKD.element_size()
    return h_BSKD.numel() * e + B * L * 8 + B * (S + L) * D * (e + pos_PD.element_size())
