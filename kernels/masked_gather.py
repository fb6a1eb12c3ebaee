"""Fused encoder input: z_proj of the kept tokens + buffer + pos-emb + LayerNorm (docs/design.md §1.2).

Triton kernel, its launcher and autograd Function, and the PyTorch reference; `masked_gather`
picks one through `dream_fast.kernels.dispatch.use_triton`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from dream_fast.kernels.decoder_fill import check_keep_idx, source_rows
from dream_fast.kernels.dispatch import use_triton

from dream_fast.kernels import dispatch

__all__ = [
    "VARIANTS",
    "block_rows",
    "bytes_moved",
    "make_inputs",
    "masked_gather",
    "masked_gather_reference",
    "num_warps",
]


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
    eps: tl.float32,  # pinned: a compiled caller may hand a Python float in as fp64
    BLOCK_R: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B, cdiv(S+K, BLOCK_ROWS)): a program walks BLOCK_ROWS rows in register-sized
    tiles of BLOCK_R, so the LN parameters are loaded once per program, not per tile. The row
    loop is a runtime loop on purpose: unrolled (tl.static_range) the backward spilled 3 KB."""
    b = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1).to(tl.int64) * BLOCK_ROWS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lnw = tl.load(lnw_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for r0 in range(0, BLOCK_ROWS, BLOCK_R):
        rows = row0 + r0 + tl.arange(0, BLOCK_R)
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
    dx_ptr,
    L,
    C,
    D,
    S,
    K,
    eps: tl.float32,
    BLOCK_R: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    """Backward of one program's BLOCK_ROWS rows. The token gradient has one writer per row;
    the shared gradients (LN affine, bias: summed over the program's rows in registers) go out
    as fp32 atomics, or with DETERMINISTIC as one partial row per program (dlnw/dlnb/dbias
    pointers then index (programs, D) buffers) plus the pre-LN gradient dx, from which the
    launcher forms dpos and dweight by fixed-order reductions (docs/design.md §1.2)."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    row0 = tile * BLOCK_ROWS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lnw = tl.load(lnw_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    acc_lnw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_lnb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, BLOCK_ROWS, BLOCK_R):
        rows = row0 + r0 + tl.arange(0, BLOCK_R)
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
        row_offs = (b * (S + K) + rows)[:, None] * D + offs_d[None, :]
        dy = tl.load(dy_ptr + row_offs, mask=m2, other=0.0).to(tl.float32)
        acc_lnw += tl.sum(dy * xhat, axis=0)
        acc_lnb += tl.sum(dy, axis=0)

        dxhat = dy * lnw[None, :]
        c1 = tl.sum(dxhat, axis=1) / D
        c2 = tl.sum(dxhat * xhat, axis=1) / D
        dx = tl.where(m2, (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None], 0.0)
        dx_tok = tl.where(is_tok[:, None], dx, 0.0)
        acc_bias += tl.sum(dx_tok, axis=0)
        if DETERMINISTIC:
            tl.store(dx_ptr + row_offs, dx, mask=m2)
        else:
            # Different batch rows hit the same pos row: atomics. Buffer rows own pos rows [0, S),
            # so the buffer gradient is read back from dpos[:S] by the launcher.
            tl.atomic_add(dpos_ptr + pos_row[:, None] * D + offs_d[None, :], dx, mask=m2)
        for c in range(0, C):
            w_c = tl.load(w_ptr + offs_d * C + c, mask=mask_d, other=0.0).to(tl.float32)
            # keep_idx rows are duplicate-free, so each (b, idx) token row is written by one program.
            dt_c = tl.sum(dx_tok * w_c[None, :], axis=1)
            tl.store(dtok_ptr + b * L * C + idx * C + c, dt_c.to(dtok_ptr.dtype.element_ty), mask=is_tok)
            if not DETERMINISTIC:
                t_c = tl.load(tok_base + c, mask=is_tok, other=0.0).to(tl.float32)
                tl.atomic_add(dw_ptr + offs_d * C + c, tl.sum(dx_tok * t_c[:, None], axis=0), mask=mask_d)
    if DETERMINISTIC:
        part = (b * tl.num_programs(1) + tile) * D
        tl.store(dlnw_ptr + part + offs_d, acc_lnw, mask=mask_d)
        tl.store(dlnb_ptr + part + offs_d, acc_lnb, mask=mask_d)
        tl.store(dbias_ptr + part + offs_d, acc_bias, mask=mask_d)
    else:
        tl.atomic_add(dlnw_ptr + offs_d, acc_lnw, mask=mask_d)
        tl.atomic_add(dlnb_ptr + offs_d, acc_lnb, mask=mask_d)
        tl.atomic_add(dbias_ptr + offs_d, acc_bias, mask=mask_d)


# ----------------------------------------------------------------------------- launchers
VARIANTS = ("baseline", "multirow")  # one register tile per program, or BLOCK_ROWS chosen by size
DEFAULT_VARIANT = "multirow"
_MAX_TILES_PER_PROGRAM = 8


def _target_programs(device: torch.device) -> int:
    sms = dispatch.sm_count(device)
    # the interpreter: few programs (and several tiles each at the test shapes)
    return 2 if sms is None else 8 * sms


def _blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 16))
    # ~4K fp32 elements per (rows x D) tile keeps registers in check at D = 768-1664.
    block_r = max(1, min(16, 4096 // block_d))
    return block_r, block_d


def num_warps(block_d: int, variant: str = DEFAULT_VARIANT) -> int:
    """8 warps from D = 1024 up: the backward's ~8 live (BLOCK_R, BLOCK_D) fp32 tiles plus the
    row loop's accumulators spill at 4 warps (sm_90, Triton 3.9: 232 B of stack at D = 1280),
    and fit in 235 registers at 8. "baseline" (one tile per program) keeps 4 warps from
    BLOCK_D = 2048 (D = 1280-1664): at 8, ptxas held its atomic backward to 128 registers and
    spilled 8 B in bf16/fp16 (sm_90, Triton 3.9); at 4 it fits in 255 with no spill. At
    BLOCK_D = 1024 it is the other way round (8 B of stack at 4 warps, none at 8)."""
    if variant == "baseline" and block_d >= 2048:
        return 4
    return 8 if block_d >= 1024 else 4


def block_rows(B: int, R: int, D: int, device: torch.device, variant: str = DEFAULT_VARIANT) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_ROWS, BLOCK_D) for B x R output rows of width D.

    BLOCK_R x BLOCK_D is the register tile (width decides BLOCK_R: 4 rows at D = 768, 2 at
    1280-1664); BLOCK_ROWS = BLOCK_R x t rows per program, t a power of two <= 8 chosen by size,
    the largest that still leaves ~8 programs per SM, so small launches keep their parallelism
    and large ones stop paying per-program setup (LN params, one partial row in deterministic
    mode) for 2-4 rows. "baseline" keeps one tile per program (the kernel before this change)."""
    if variant not in VARIANTS:
        raise ValueError(f"masked_gather: variant {variant!r} unknown; allowed: {list(VARIANTS)}")
    block_r, block_d = _blocks(D)
    if variant == "baseline":
        return block_r, block_r, block_d
    tiles = B * triton.cdiv(max(R, 1), block_r)
    t = 1
    while t < _MAX_TILES_PER_PROGRAM and tiles // (2 * t) >= _target_programs(device):
        t *= 2
    # never more tiles per program than a batch row has
    t = min(t, triton.next_power_of_2(triton.cdiv(max(R, 1), block_r)))
    return block_r, block_r * t, block_d


def masked_gather_forward(
    tokens_BLC,
    keep_idx_BK,
    weight_DC,
    bias_D,
    pos_PD,
    buffer_SD,
    ln_weight_D,
    ln_bias_D,
    eps: float,
    variant: str = DEFAULT_VARIANT,
) -> torch.Tensor:
    B, L, C = tokens_BLC.shape
    K = keep_idx_BK.shape[1]
    S, D = buffer_SD.shape
    out = _alloc((B, S + K, D), tokens_BLC, tokens_BLC.dtype)
    if out.numel() == 0:
        return out
    block_r, rows_per_prog, block_d = block_rows(B, S + K, D, tokens_BLC.device, variant)
    grid = (B, triton.cdiv(S + K, rows_per_prog))
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
        float(eps),
        BLOCK_R=block_r,
        BLOCK_ROWS=rows_per_prog,
        BLOCK_D=block_d,
        num_warps=num_warps(block_d, variant),
    )
    return out


def masked_gather_backward(
    dy_BRD,
    tokens_BLC,
    keep_idx_BK,
    weight_DC,
    bias_D,
    pos_PD,
    buffer_SD,
    ln_weight_D,
    eps: float,
    variant: str = DEFAULT_VARIANT,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """Returns fp32 grads (tokens, weight, bias, pos, buffer, ln_weight, ln_bias); caller casts.

    `deterministic` (default: `dispatch.deterministic()`) swaps every atomic for per-program
    partials and fixed-order reductions: bitwise-reproducible gradients, at the cost of one
    (B, S+K, D) fp32 store and re-read of the pre-LN gradient."""
    B, L, C = tokens_BLC.shape
    K = keep_idx_BK.shape[1]
    S, D = buffer_SD.shape
    dev = tokens_BLC.device
    det = dispatch.deterministic() if deterministic is None else deterministic
    f32 = dict(device=dev, dtype=torch.float32)
    # Unkept token rows get no contribution: zeros, never poisoned.
    dtok = torch.zeros((B, L, C), device=dev, dtype=tokens_BLC.dtype)
    if B * (S + K) == 0:
        zeros = [torch.zeros(shape, **f32) for shape in ((D, C), (D,), pos_PD.shape, (S, D), (D,), (D,))]
        return (dtok, *zeros)
    block_r, rows_per_prog, block_d = block_rows(B, S + K, D, dev, variant)
    grid = (B, triton.cdiv(S + K, rows_per_prog))
    if det:
        programs = grid[0] * grid[1]
        dlnw, dlnb, dbias = (_alloc((programs, D), tokens_BLC, torch.float32) for _ in range(3))
        dx = _alloc((B, S + K, D), tokens_BLC, torch.float32)
        dw = dpos = dx  # not written: formed below from dx
    else:
        dw, dbias = torch.zeros((D, C), **f32), torch.zeros(D, **f32)
        dpos, dlnw, dlnb = torch.zeros(pos_PD.shape, **f32), torch.zeros(D, **f32), torch.zeros(D, **f32)
        dx = dpos  # not written
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
        dx,
        L,
        C,
        D,
        S,
        K,
        float(eps),
        BLOCK_R=block_r,
        BLOCK_ROWS=rows_per_prog,
        BLOCK_D=block_d,
        DETERMINISTIC=det,
        num_warps=num_warps(block_d, variant),
    )
    if not det:
        return dtok, dw, dbias, dpos, dpos[:S].clone(), dlnw, dlnb
    # Fixed-order reductions (torch sums and GEMMs use no atomics; cuBLAS bitwise reproducibility
    # needs CUBLAS_WORKSPACE_CONFIG=:4096:8, as torch.use_deterministic_algorithms documents).
    dbuf = dx[:, :S].sum(0)
    dpos = torch.zeros(pos_PD.shape, **f32)
    dpos[:S] = dbuf
    dw = torch.zeros((D, C), **f32)
    if K:
        dx_tok = dx[:, S:]
        src = source_rows(keep_idx_BK, L)  # (B, L): which kept row fills position p, or -1
        gathered = torch.gather(dx_tok, 1, src.clamp(min=0)[..., None].expand(B, L, D))
        dpos[S:] = torch.where(src[..., None] >= 0, gathered, 0.0).sum(0)
        tok_kept = torch.gather(tokens_BLC, 1, keep_idx_BK[..., None].expand(B, K, C)).float()
        dw = dx_tok.reshape(B * K, D).t() @ tok_kept.reshape(B * K, C)
    return dtok, dw, dbias.sum(0), dpos, dbuf, dlnw.sum(0), dlnb.sum(0)


class MaskedGatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, keep_idx, weight, bias, pos, buffer, ln_weight, ln_bias, eps, variant=DEFAULT_VARIANT):
        tensors = [t.contiguous() for t in (tokens, keep_idx, weight, bias, pos, buffer, ln_weight, ln_bias)]
        ctx.save_for_backward(*tensors[:7])
        ctx.eps = eps
        ctx.variant = variant
        ctx.deterministic = dispatch.deterministic()  # the mode at forward time decides the backward
        ctx.ln_bias_dtype = ln_bias.dtype
        return masked_gather_forward(*tensors, eps, variant)

    @staticmethod
    def backward(ctx, dy):
        tokens, keep_idx, weight, bias, pos, buffer, ln_weight = ctx.saved_tensors
        dtok, dw, dbias, dpos, dbuf, dlnw, dlnb = masked_gather_backward(
            dy, tokens, keep_idx, weight, bias, pos, buffer, ln_weight, ctx.eps, ctx.variant, ctx.deterministic
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
        return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad)], None, None)


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
    if validate:
        # Host-syncing checks, off by default on CUDA: the kernel relies on both for exact gradients.
        check_keep_idx(keep_idx_BK, L, op="masked_gather")


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
    variant: str = DEFAULT_VARIANT,
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
    check range and distinctness (host sync); the Triton path on CPU tensors (interpreter) always
    checks, since there it costs no sync (the reference handles duplicates exactly). Output
    dtype = tokens dtype; params are cast to it (reference) or read in fp32 (kernel).
    `variant`: "multirow" (rows per program chosen by size) or "baseline" (one register tile per
    program); the backward is atomic-free under `dream_fast.kernels.set_deterministic(True)`.
    """
    _check(tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, ln_bias_D, validate)
    if variant not in VARIANTS:
        raise ValueError(f"masked_gather: variant {variant!r} unknown; allowed: {list(VARIANTS)}")
    tensors = (tokens_BLC, keep_idx_BK, weight_DC, bias_D, pos_PD, buffer_SD, ln_weight_D, ln_bias_D)
    if use_triton(*tensors):
        if not validate and keep_idx_BK.device.type == "cpu":
            check_keep_idx(keep_idx_BK, L=tokens_BLC.shape[1], op="masked_gather")
        return MaskedGatherFunction.apply(*tensors, eps, variant)
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
