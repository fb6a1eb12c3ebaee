"""Decoder input fill: kept rows back in place, mask token elsewhere, + decoder pos-emb (docs/design.md §1.4).

Triton kernels, launchers and autograd Function beside the PyTorch reference; `decoder_fill`
picks one through `dream_fast.kernels.dispatch.use_triton`. The backward has no atomics in any
mode (batch-chunk partials reduced in a fixed order), so it is always bitwise reproducible.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from dream_fast.kernels.dispatch import sm_count, use_triton

__all__ = [
    "VARIANTS",
    "batch_chunks",
    "bytes_moved",
    "check_keep_idx",
    "decoder_fill",
    "decoder_fill_reference",
    "make_inputs",
    "source_rows",
]


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
    dmask_part_ptr,
    dpos_part_ptr,
    B,
    L,
    D,
    S,
    K,
    batch_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (batch chunks, row tiles, D tiles): parallel over the batch, no atomics.

    A program owns a (rows x D-slice) tile for `batch_per_program` batch rows: dh rows are
    gathered copies of dy (one writer each, keep_idx rows being duplicate-free); the pos and
    mask-token gradients are summed over its batch rows in registers and stored as one partial
    per chunk, which the launcher reduces in a fixed order (bitwise reproducible, docs/design.md §1.4).
    """
    chunk = tl.program_id(0).to(tl.int64)
    tile_r = tl.program_id(1).to(tl.int64)
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows in [0, S+L)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    valid = rows < S + L
    is_tok = valid & (rows >= S)
    p = tl.maximum(rows - S, 0)
    dpos = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    dmask = tl.zeros((BLOCK_D,), dtype=tl.float32)
    b0 = chunk * batch_per_program
    for i in range(0, batch_per_program):
        b = b0 + i  # int64: b * (S+L) * D stays exact at any batch
        row_ok = valid & ((rows * 0 + b) < B)  # vector compare: a scalar bool mask trips the interpreter
        m2 = row_ok[:, None] & mask_d[None, :]
        dy = tl.load(dy_ptr + (b * (S + L) + rows)[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
        dy = dy.to(tl.float32)
        dpos += dy
        src = tl.load(src_ptr + b * L + p, mask=is_tok & row_ok, other=-1)
        to_h = row_ok & ((rows < S) | (src >= 0))
        h_row = tl.where(is_tok, S + src, rows)
        tl.store(
            dh_ptr + (b * (S + K) + h_row)[:, None] * D + offs_d[None, :],
            dy.to(dh_ptr.dtype.element_ty),
            mask=to_h[:, None] & mask_d[None, :],
        )
        dmask += tl.sum(tl.where((is_tok & row_ok & (src < 0))[:, None], dy, 0.0), axis=0)
    m_out = valid[:, None] & mask_d[None, :]
    tl.store(dpos_part_ptr + (chunk * (S + L) + rows)[:, None] * D + offs_d[None, :], dpos, mask=m_out)
    n_tiles = tl.num_programs(1)
    tl.store(dmask_part_ptr + (chunk * n_tiles + tile_r) * D + offs_d, dmask, mask=mask_d)


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


VARIANTS = ("serial", "parallel")  # backward over the batch: one chunk, or chunks by size
DEFAULT_VARIANT = "parallel"


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device a few times over."""
    sms = sm_count(device)
    # the interpreter: few programs, but more than one batch chunk at the test shapes
    return 4 if sms is None else 4 * sms


def batch_chunks(B: int, tiles: int, device: torch.device, variant: str = DEFAULT_VARIANT) -> int:
    """How many batch chunks the backward grid runs in parallel: enough programs to fill the
    device (tiles x chunks >= target), each chunk's partial costing one (S+L, D) fp32 buffer."""
    if variant not in VARIANTS:
        raise ValueError(f"decoder_fill: variant {variant!r} unknown; allowed: {list(VARIANTS)}")
    if variant == "serial" or B <= 1:
        return 1
    return max(1, min(B, triton.cdiv(_target_programs(device), max(tiles, 1))))


def decoder_fill_backward(
    dy_BPD, src_BL, K: int, h_dtype: torch.dtype, variant: str = DEFAULT_VARIANT
) -> tuple[torch.Tensor, ...]:
    """Returns (grad_h in h's dtype, fp32 grad_mask_token, fp32 grad_pos); atomic-free."""
    B, P, D = dy_BPD.shape
    L = src_BL.shape[1]
    S = P - L
    dev = dy_BPD.device
    if B == 0 or P * D == 0:
        return (
            torch.zeros((B, S + K, D), device=dev, dtype=h_dtype),
            torch.zeros(D, device=dev, dtype=torch.float32),
            torch.zeros((P, D), device=dev, dtype=torch.float32),
        )
    dh = _alloc((B, S + K, D), dy_BPD, h_dtype)
    block_d = min(_BLOCK_D, triton.next_power_of_2(D))
    tiles_r, tiles_d = triton.cdiv(P, _BLOCK_R), triton.cdiv(D, block_d)
    chunks = batch_chunks(B, tiles_r * tiles_d, dev, variant)
    per_chunk = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, per_chunk)  # no empty trailing chunk
    dpos_part = _alloc((chunks, P, D), dy_BPD, torch.float32)
    dmask_part = _alloc((chunks, tiles_r, D), dy_BPD, torch.float32)
    _decoder_fill_bwd_kernel[(chunks, tiles_r, tiles_d)](
        dy_BPD.contiguous(),
        src_BL,
        dh,
        dmask_part,
        dpos_part,
        B,
        L,
        D,
        S,
        K,
        per_chunk,
        BLOCK_R=_BLOCK_R,
        BLOCK_D=block_d,
    )
    # Fixed-order reductions of the partials (torch reductions use no atomics): reproducible.
    dpos = dpos_part[0] if chunks == 1 else dpos_part.sum(0)
    return dh, dmask_part.sum((0, 1)), dpos


class DecoderFillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, keep_idx, mask_token, pos, L, variant=DEFAULT_VARIANT):
        src = source_rows(keep_idx, L)
        ctx.save_for_backward(src)
        ctx.K = keep_idx.shape[1]
        ctx.variant = variant
        ctx.dtypes = (h.dtype, mask_token.dtype, pos.dtype)
        return decoder_fill_forward(h.contiguous(), src, mask_token.contiguous(), pos.contiguous(), L)

    @staticmethod
    def backward(ctx, dy):
        (src,) = ctx.saved_tensors
        h_dt, m_dt, p_dt = ctx.dtypes
        dh, dmask, dpos = decoder_fill_backward(dy, src, ctx.K, h_dt, ctx.variant)
        grads = (dh, None, dmask.to(m_dt), dpos.to(p_dt), None, None)
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
        check_keep_idx(keep_idx_BK, L)


def check_keep_idx(keep_idx_BK: torch.Tensor, L: int, op: str = "decoder_fill") -> None:
    """Range and distinctness of keep_idx rows (host sync on a GPU; free on CPU tensors)."""
    if not keep_idx_BK.numel():
        return
    if int(keep_idx_BK.min()) < 0 or int(keep_idx_BK.max()) >= L:
        raise ValueError(f"{op}: keep_idx_BK values must lie in [0, {L})")
    srt = keep_idx_BK.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
    if bool(dup.any()):
        b = int(dup.nonzero()[0, 0])
        raise ValueError(
            f"{op}: keep_idx_BK rows must be duplicate-free (a slice of a permutation); row {b} "
            "repeats an index. The Triton backward writes each kept row's gradient once, so a "
            "duplicate would silently lose gradient"
        )


def decoder_fill(
    h_BSKD: torch.Tensor,
    keep_idx_BK: torch.Tensor,
    mask_token_D: torch.Tensor,
    pos_PD: torch.Tensor,
    L: int,
    validate: bool = False,
    variant: str = DEFAULT_VARIANT,
) -> torch.Tensor:
    """Full-length decoder input (B, S+L, D) from the encoder rows of the buffer and kept tokens.

    With K = keep_idx_BK.shape[1], S = h_BSKD.shape[1] - K (buffer rows) and p in [0, L):

        out[b, j]     = h[b, j] + pos[j]                                  j < S
        out[b, S + p] = h[b, S + k] + pos[S + p]     if keep_idx[b, k] == p
        out[b, S + p] = mask_token + pos[S + p]      if p is not kept

    Gradients: grad_h is a gather of grad_out at the kept positions, grad_mask_token the sum of
    grad_out over masked positions, grad_pos the batch sum of grad_out. keep_idx_BK is int64
    (B, K) with duplicate-free rows (a slice of a random permutation), 0 <= K <= L; validate=True
    checks range and distinctness (host sync); the Triton path on CPU tensors (interpreter) always
    checks, since there it costs no sync. The source row of each output position is built on
    the device (a scatter of arange into a -1-filled (B, L) map), so no step syncs the host.
    `variant` picks the backward's batch split ("parallel": chunks by size; "serial": one chunk,
    the pre-2026-12 kernel's order), both atomic-free and bitwise reproducible.
    """
    _check(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L, validate)
    if variant not in VARIANTS:
        raise ValueError(f"decoder_fill: variant {variant!r} unknown; allowed: {list(VARIANTS)}")
    if use_triton(h_BSKD, keep_idx_BK, mask_token_D, pos_PD):
        if not validate and keep_idx_BK.device.type == "cpu":
            check_keep_idx(keep_idx_BK, L)
        return DecoderFillFunction.apply(h_BSKD, keep_idx_BK, mask_token_D, pos_PD, L, variant)
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
