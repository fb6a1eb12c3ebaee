"""Fused AdaLN residual block of the per-token diffusion head (docs/design.md §1.5, MAR's ResBlock).

Triton kernels (three fused GEMMs forward, fused elementwise/LayerNorm kernels backward), the
autograd Function, the PyTorch reference `adaln_block_reference` and the dispatching `adaln_block`.

Math, per row n (x, y ∈ R^W; nn.Linear weights are (out, in)):

    shift, scale, gate = chunk(SiLU(y) @ mod_wᵀ + mod_b, 3)          # mod_w: (3W, W)
    h0  = LN(x; ln_w, ln_b, eps) · (1 + scale) + shift
    a1  = h0 @ fc1_wᵀ + fc1_b
    h2  = SiLU(a1) @ fc2_wᵀ + fc2_b
    out = x + gate · h2

Forward kernels (fp32 accumulation, tl.dot operands in the input dtype), variant "grouped"
(default; "baseline" is the same chain without the prepass, SiLU on load and 2-D grids):
  0. `_silu_fwd_kernel`: SiLU(y) once (baseline: recomputed in kernel 1 per column block).
  1. `_adaln_modulate_kernel`: SiLU(y) @ mod_wᵀ for the shift/scale/gate column blocks, with the
     LayerNorm statistics of x accumulated in the same K loop, then LN + modulate → h0 (and gate).
  2. `_fused_linear_kernel`: a1 = h0 @ fc1ᵀ + b1, h1 = SiLU(a1) in the epilogue (a1 stored only
     when training: backward needs it for SiLU'). Baseline stores a1 only.
  3. `_fused_linear_kernel` again: out = x + gate · (h1 @ fc2ᵀ + b2) (baseline: SiLU(a1) on load,
     once per column block).
GEMM kernels take their (pid_m, pid_n) from `_tile_coords`: grouped (swizzled) order with
GROUP_M row blocks per group, so weight and activation tiles are reused from L2.

Backward: torch GEMMs for the six weight/input products around three Triton kernels
(`_adaln_bwd_out_kernel`, `_silu_bwd_kernel`, `_adaln_ln_bwd_kernel`). Saved for backward:
mean/rstd (N each), h0, a1, h2, scale, gate (N×W each). Recomputed instead of stored: x̂ from
x/mean/rstd, SiLU(a1) and SiLU(y) (one elementwise pass each, cheaper than an N×W store + load).
h2 is stored because recomputing it would cost a GEMM.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from dream_fast.kernels.dispatch import interpreter_active, sm_count, use_triton

__all__ = [
    "VARIANTS",
    "adaln_block",
    "adaln_block_reference",
    "AdaLNBlockFunction",
    "make_inputs",
    "flops",
    "bytes_moved",
]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _tile_coords(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, int64. GROUP_M = 0: a 2-D grid, pid_m fastest (every row
    block of one column block runs together, so the activations are re-read from HBM for each
    column block). GROUP_M > 0: a 1-D grid swizzled in groups of GROUP_M row blocks that sweep
    all column blocks: the programs in flight share GROUP_M row blocks of A and the weight, both
    held in L2 (Triton's grouped ordering)."""
    if GROUP_M == 0:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        num_m = tl.cdiv(n_rows, BLOCK_M)
        num_n = tl.cdiv(n_cols, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
    return pid_m.to(tl.int64), pid_n.to(tl.int64)


@triton.jit
def _silu_fwd_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out = SiLU(x): the grouped variant's prepass, so SiLU(y) is computed once per element,
    not once per column block of the modulation GEMM."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * tl.sigmoid(x)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _adaln_modulate_kernel(
    x_ptr,
    y_ptr,
    lnw_ptr,
    lnb_ptr,
    modw_ptr,
    modb_ptr,  # inputs
    h0_ptr,
    gate_ptr,
    scale_ptr,
    mean_ptr,
    rstd_ptr,  # outputs (scale/mean/rstd only if SAVE)
    N,
    W,
    eps: tl.float32,  # pinned: a compiled caller may hand a Python float in as fp64
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    Y_IS_SILU: tl.constexpr,
):
    """y_ptr holds y, or SiLU(y) when Y_IS_SILU (the prepass ran); GROUP_M: see _tile_coords."""
    pid_m, pid_n = _tile_coords(N, W, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < W
    dot_ty = modw_ptr.dtype.element_ty

    # LN statistics ride along the K loop (x tiles share the y tiles' coordinates). Sums are
    # taken around a per-row pivot (the row's first element) so E[d²] − E[d]² does not cancel
    # catastrophically when the residual stream has a large mean.
    pivot = tl.load(x_ptr + rows * W, mask=row_ok, other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_shift = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Rows j, W + j, 2W + j of mod_w produce shift_j, scale_j, gate_j (cols is int64: no overflow).
    w_shift = modw_ptr + cols[None, :] * W
    w_scale = modw_ptr + (cols + W)[None, :] * W
    w_gate = modw_ptr + (cols + 2 * W)[None, :] * W
    for k0 in range(0, W, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < W
        m_a = row_ok[:, None] & k_ok[None, :]
        xk = tl.load(x_ptr + rows[:, None] * W + ks[None, :], mask=m_a, other=0.0).to(tl.float32)
        d = tl.where(m_a, xk - pivot[:, None], 0.0)
        s1 += tl.sum(d, axis=1)
        s2 += tl.sum(d * d, axis=1)
        if Y_IS_SILU:
            sy = tl.load(y_ptr + rows[:, None] * W + ks[None, :], mask=m_a, other=0.0).to(dot_ty)
        else:
            yk = tl.load(y_ptr + rows[:, None] * W + ks[None, :], mask=m_a, other=0.0).to(tl.float32)
            sy = (yk * tl.sigmoid(yk)).to(dot_ty)
        m_w = k_ok[:, None] & col_ok[None, :]
        kk = ks[:, None]
        w = tl.load(w_shift + kk, mask=m_w, other=0.0)
        acc_shift = tl.dot(sy, w, acc_shift, input_precision=DOT_PRECISION)
        w = tl.load(w_scale + kk, mask=m_w, other=0.0)
        acc_scale = tl.dot(sy, w, acc_scale, input_precision=DOT_PRECISION)
        w = tl.load(w_gate + kk, mask=m_w, other=0.0)
        acc_gate = tl.dot(sy, w, acc_gate, input_precision=DOT_PRECISION)

    mean_d = s1 / W
    var = tl.maximum(s2 / W - mean_d * mean_d, 0.0)
    mean = pivot + mean_d
    rstd = 1.0 / tl.sqrt(var + eps)

    shift = acc_shift + tl.load(modb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    scale = acc_scale + tl.load(modb_ptr + W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    gate = acc_gate + tl.load(modb_ptr + 2 * W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    m_o = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * W + cols[None, :]
    xc = tl.load(x_ptr + offs, mask=m_o, other=0.0).to(tl.float32)
    lw = tl.load(lnw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    lb = tl.load(lnb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    xn = (xc - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]
    h0 = xn * (1.0 + scale) + shift
    tl.store(h0_ptr + offs, h0.to(h0_ptr.dtype.element_ty), mask=m_o)
    tl.store(gate_ptr + offs, gate.to(gate_ptr.dtype.element_ty), mask=m_o)
    if SAVE:
        tl.store(scale_ptr + offs, scale.to(scale_ptr.dtype.element_ty), mask=m_o)
        if pid_n == 0:  # every column block has the stats; one writes them
            tl.store(mean_ptr + rows, mean, mask=row_ok)
            tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _fused_linear_kernel(
    a_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    res_ptr,
    gate_ptr,
    pre_ptr,
    M,
    K,
    NOUT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    A_SILU: tl.constexpr,
    GATED_RESIDUAL: tl.constexpr,
    STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    OUT_SILU: tl.constexpr,
):
    """out = [res + gate ·] act_out(act_in(A) @ Wᵀ + b); act_in = SiLU if A_SILU, act_out = SiLU
    if OUT_SILU; `pre` = the GEMM + bias before act_out and the residual, if stored."""
    pid_m, pid_n = _tile_coords(M, NOUT, BLOCK_M, BLOCK_N, GROUP_M)
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    row_ok = pid_m * BLOCK_M + r < M
    col_ok = pid_n * BLOCK_N + c < NOUT
    # int64 scalar bases (pid_m is int64: no overflow past 2^31 elements) plus int32 offsets
    # inside the tile (< BLOCK_M·K elements): int64 offset tiles cost two registers per element
    # and made this kernel spill (sm_90, Triton 3.9, bf16: 392 B of stack at 128x128x64; 80 B now).
    a_ptrs = a_ptr + pid_m * BLOCK_M * K + (r[:, None] * K + kk[None, :])
    w_ptrs = w_ptr + pid_n * BLOCK_N * K + (c[None, :] * K + kk[:, None])
    dot_ty = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + kk < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if A_SILU:
            # SiLU applied to the A tile on load (baseline variant): recomputed once per column
            # block, which costs one sigmoid per BLOCK_N multiply-adds.
            af = a.to(tl.float32)
            a = (af * tl.sigmoid(af)).to(dot_ty)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc += tl.load(b_ptr + pid_n * BLOCK_N + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    m_o = row_ok[:, None] & col_ok[None, :]
    base = pid_m * BLOCK_M * NOUT + pid_n * BLOCK_N
    offs = r[:, None] * NOUT + c[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + base + offs, acc.to(pre_ptr.dtype.element_ty), mask=m_o)
    if OUT_SILU:
        # SiLU once per output element in the epilogue (the grouped variant's fc1), instead of
        # once per column block on the next GEMM's A tiles.
        acc = acc * tl.sigmoid(acc)
    if GATED_RESIDUAL:
        g = tl.load(gate_ptr + base + offs, mask=m_o, other=0.0).to(tl.float32)
        res = tl.load(res_ptr + base + offs, mask=m_o, other=0.0).to(tl.float32)
        acc = res + g * acc
    tl.store(out_ptr + base + offs, acc.to(out_ptr.dtype.element_ty), mask=m_o)


@triton.jit
def _adaln_bwd_out_kernel(
    dout_ptr, h2_ptr, gate_ptr, a1_ptr, dh2_ptr, dmod_ptr, h1_ptr, numel, W, BLOCK: tl.constexpr
):
    """dh2 = dout·gate; dgate = dout·h2 → dmod[:, 2W:]; h1 = SiLU(a1) (recomputed for dfc2_w)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel  # N·W from the host: an int32 product in the kernel could overflow
    row = offs // W
    col = offs % W
    g = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h2 = tl.load(h2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a1 = tl.load(a1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dh2_ptr + offs, (g * gate).to(dh2_ptr.dtype.element_ty), mask=ok)
    tl.store(dmod_ptr + row * (3 * W) + 2 * W + col, (g * h2).to(dmod_ptr.dtype.element_ty), mask=ok)
    tl.store(h1_ptr + offs, (a1 * tl.sigmoid(a1)).to(h1_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_bwd_kernel(g_ptr, a_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out = g · SiLU'(a), SiLU'(a) = σ(a)·(1 + a·(1 − σ(a)))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(out_ptr + offs, (g * s * (1.0 + a * (1.0 - s))).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _adaln_ln_bwd_kernel(
    dh0_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    scale_ptr,
    lnw_ptr,
    lnb_ptr,
    dout_ptr,
    dx_ptr,
    dmod_ptr,
    dlnw_part_ptr,
    dlnb_part_ptr,
    N,
    W,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Backward of h0 = (x̂·ln_w + ln_b)(1 + scale) + shift, plus the residual's dout.

    dshift = dh0, dscale = dh0·xn (→ dmod[:, :2W]); dxn = dh0(1 + scale); dx̂ = dxn·ln_w;
    dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) + dout. Each program walks `rows_per_program`
    rows and writes one partial row of dln_w/dln_b, so the partial buffers stay (programs, W).
    """
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    col_ok = cols < W
    lw = tl.load(lnw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    lb = tl.load(lnb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros((BLOCK_W,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_W,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for r0 in range(0, rows_per_program, BLOCK_M):
        rows = row_start + r0 + tl.arange(0, BLOCK_M)
        row_ok = (rows < N) & (r0 + tl.arange(0, BLOCK_M) < rows_per_program)
        m = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * W + cols[None, :]
        dh0 = tl.load(dh0_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + offs, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        xn = xhat * lw[None, :] + lb[None, :]
        dmod_offs = rows[:, None] * (3 * W) + cols[None, :]
        tl.store(dmod_ptr + dmod_offs, dh0.to(dmod_ptr.dtype.element_ty), mask=m)
        tl.store(dmod_ptr + dmod_offs + W, (dh0 * xn).to(dmod_ptr.dtype.element_ty), mask=m)
        dxn = dh0 * (1.0 + sc)
        acc_w += tl.sum(dxn * xhat, axis=0)
        acc_b += tl.sum(dxn, axis=0)
        dxhat = dxn * lw[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / W
        c2 = tl.sum(dxhat, axis=1) / W
        res = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None] + res
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dlnw_part_ptr + pid * W + cols, acc_w, mask=col_ok)
    tl.store(dlnb_part_ptr + pid * W + cols, acc_b, mask=col_ok)


# ----------------------------------------------------------------------------- launchers
def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here: NaN-filled under DREAM_KERNELS_POISON=1 (tests),
    so any element a kernel forgets to write fails the comparison."""
    if os.environ.get("DREAM_KERNELS_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32: the reference (torch matmul) is exact fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


VARIANTS = ("baseline", "grouped")
DEFAULT_VARIANT = "grouped"
_LARGE_N = 4096  # rows above which the fc GEMMs take BLOCK_M = 128 (tests lower it)


def _gemm_blocks(n_rows: int, three_acc: bool) -> dict[str, int]:
    """Tile sizes. The interpreter wants few, small programs; GPU sizes are a first guess
    (not yet tuned on hardware): kernel 1 holds three accumulators, so it gets smaller tiles.
    `DREAM_KERNELS_TILES=gpu` makes the interpreter use the GPU sizes (tests of those paths)."""
    if interpreter_active() and os.environ.get("DREAM_KERNELS_TILES", "") != "gpu":
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    if three_acc:
        # BLOCK_K = 32: at 64 the three accumulators plus their operand tiles spilled in bf16
        # (sm_90, Triton 3.9: 520 B of stack; 32 B at 32)
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
    bm = 64 if n_rows <= _LARGE_N else 128
    return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _group_m() -> int:
    # 8 row blocks per group on a GPU (64-128 rows each: 0.5-1K rows of activations live in L2
    # while the group sweeps every column block); 2 in the interpreter so small test grids
    # still have several groups, the last one ragged.
    return 2 if interpreter_active() and os.environ.get("DREAM_KERNELS_TILES", "") != "gpu" else 8


def _grid(n_rows: int, n_cols: int, cfg: dict[str, int], group_m: int) -> tuple[int, ...]:
    gm, gn = triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(n_cols, cfg["BLOCK_N"])
    return (gm * gn,) if group_m else (gm, gn)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"adaln_block: variant {variant!r} unknown; allowed: {list(VARIANTS)}")


def adaln_block_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    mod_w: torch.Tensor,
    mod_b: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor,
    eps: float,
    save: bool,
    variant: str = DEFAULT_VARIANT,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Launch the forward kernels on contiguous (N, W) inputs; returns (out, saved).

    "baseline": 2-D grids (pid_m fastest), SiLU(y) recomputed per column block of the
    modulation GEMM and SiLU(a1) per column block of fc2. "grouped": swizzled 1-D grids
    (GROUP_M), a SiLU(y) prepass, and SiLU(a1) applied once in fc1's epilogue. Both save the
    same tensors for backward."""
    _check_variant(variant)
    grouped = variant == "grouped"
    group_m = _group_m() if grouped else 0
    N, W = x.shape
    dev, dt = x.device, x.dtype
    prec = _dot_precision(dt)
    y_in = y
    if grouped:
        y_in = _new_output((N, W), dt, dev)
        block = 1024
        _silu_fwd_kernel[(triton.cdiv(N * W, block),)](y, y_in, N * W, BLOCK=block)
    h0 = _new_output((N, W), dt, dev)
    gate = _new_output((N, W), dt, dev)
    scale = _new_output((N, W), dt, dev) if save else h0  # dummies are never written (SAVE=False)
    mean = _new_output((N,), torch.float32, dev) if save else h0
    rstd = _new_output((N,), torch.float32, dev) if save else h0
    cfg = _gemm_blocks(N, three_acc=True)
    _adaln_modulate_kernel[_grid(N, W, cfg, group_m)](
        x,
        y_in,
        ln_w,
        ln_b,
        mod_w,
        mod_b,
        h0,
        gate,
        scale,
        mean,
        rstd,
        N,
        W,
        eps,
        SAVE=save,
        DOT_PRECISION=prec,
        GROUP_M=group_m,
        Y_IS_SILU=grouped,
        **cfg,
    )
    del y_in
    cfg = _gemm_blocks(N, three_acc=False)
    grid = _grid(N, W, cfg, group_m)
    # fc1: baseline stores a1 and fc2 applies SiLU on load; grouped stores h1 = SiLU(a1) (and a1
    # for backward only when training) and fc2 reads h1 as is.
    a1 = _new_output((N, W), dt, dev) if (save or not grouped) else None
    h1 = _new_output((N, W), dt, dev) if grouped else a1
    fc1_out = h1 if grouped else a1
    _fused_linear_kernel[grid](
        h0,
        fc1_w,
        fc1_b,
        fc1_out,
        fc1_out,
        fc1_out,
        a1 if a1 is not None else fc1_out,
        N,
        W,
        W,
        A_SILU=False,
        GATED_RESIDUAL=False,
        STORE_PRE=grouped and save,
        DOT_PRECISION=prec,
        GROUP_M=group_m,
        OUT_SILU=grouped,
        **cfg,
    )
    out = _new_output((N, W), dt, dev)
    h2 = _new_output((N, W), dt, dev) if save else out
    _fused_linear_kernel[grid](
        fc1_out,
        fc2_w,
        fc2_b,
        out,
        x,
        gate,
        h2,
        N,
        W,
        W,
        A_SILU=not grouped,
        GATED_RESIDUAL=True,
        STORE_PRE=save,
        DOT_PRECISION=prec,
        GROUP_M=group_m,
        OUT_SILU=False,
        **cfg,
    )
    saved = (mean, rstd, h0, a1, h2, scale, gate) if save else ()
    return out, saved


def _silu_bwd(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    out = _new_output(tuple(a.shape), a.dtype, a.device)
    block = 1024
    _silu_bwd_kernel[(triton.cdiv(a.numel(), block),)](g, a, out, a.numel(), BLOCK=block)
    return out


def _ln_bwd_programs(N: int, device: torch.device) -> int:
    """Programs of the LN backward: each writes one (W,) partial of dln_w/dln_b, reduced by a
    torch sum in a fixed order (no atomics: bitwise reproducible in every mode)."""
    sms = sm_count(device)
    return min(N, 4 if sms is None else 4 * sms)  # interpreter: few programs


def adaln_block_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    mod_w: torch.Tensor,
    fc1_w: torch.Tensor,
    fc2_w: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, dy, dln_w, dln_b, dmod_w, dmod_b, dfc1_w, dfc1_b, dfc2_w, dfc2_b)."""
    mean, rstd, h0, a1, h2, scale, gate = saved
    N, W = x.shape
    dev, dt = x.device, x.dtype
    dmod = _new_output((N, 3 * W), dt, dev)
    dh2 = _new_output((N, W), dt, dev)
    h1 = _new_output((N, W), dt, dev)
    block = 1024
    _adaln_bwd_out_kernel[(triton.cdiv(N * W, block),)](
        dout, h2, gate, a1, dh2, dmod, h1, N * W, W, BLOCK=block
    )
    # Bias grads are summed in fp32: an fp16 sum over N ~ 10⁵ rows would lose the small terms.
    dfc2_w = dh2.t() @ h1
    dfc2_b = dh2.sum(0, dtype=torch.float32).to(dt)
    da1 = _silu_bwd(dh2 @ fc2_w, a1)
    dfc1_w = da1.t() @ h0
    dfc1_b = da1.sum(0, dtype=torch.float32).to(dt)
    dh0 = da1 @ fc1_w

    programs = _ln_bwd_programs(N, dev)
    rows_per_program = triton.cdiv(N, programs)
    dx = _new_output((N, W), dt, dev)
    dlnw_part = _new_output((programs, W), torch.float32, dev)
    dlnb_part = _new_output((programs, W), torch.float32, dev)
    block_w = triton.next_power_of_2(W)
    # ~8 live (BLOCK_M, BLOCK_W) fp32 tiles: ≤ 2048 elements each over 8 warps stays in registers
    block_m = max(1, min(16, 2048 // block_w))
    _adaln_ln_bwd_kernel[(programs,)](
        dh0,
        x,
        mean,
        rstd,
        scale,
        ln_w,
        ln_b,
        dout,
        dx,
        dmod,
        dlnw_part,
        dlnb_part,
        N,
        W,
        rows_per_program,
        BLOCK_M=block_m,
        BLOCK_W=block_w,
        num_warps=8,
    )
    dln_w = dlnw_part.sum(0).to(ln_w.dtype)
    dln_b = dlnb_part.sum(0).to(ln_b.dtype)
    dmod_w = dmod.t() @ F.silu(y)  # SiLU(y) recomputed: one elementwise pass, not stored
    dmod_b = dmod.sum(0, dtype=torch.float32).to(dt)
    dy = _silu_bwd(dmod @ mod_w, y)
    return dx, dy, dln_w, dln_b, dmod_w, dmod_b, dfc1_w, dfc1_b, dfc2_w, dfc2_b


class AdaLNBlockFunction(torch.autograd.Function):
    """Autograd wrapper around the Triton forward/backward (inputs: contiguous, one dtype)."""

    @staticmethod
    def forward(ctx, x, y, ln_w, ln_b, mod_w, mod_b, fc1_w, fc1_b, fc2_w, fc2_b, eps, save, variant=DEFAULT_VARIANT):
        # `save` is decided by the caller: grad mode is always off inside forward().
        out, saved = adaln_block_forward(
            x, y, ln_w, ln_b, mod_w, mod_b, fc1_w, fc1_b, fc2_w, fc2_b, eps, save, variant
        )
        if save:
            ctx.save_for_backward(x, y, ln_w, ln_b, mod_w, fc1_w, fc2_w, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, y, ln_w, ln_b, mod_w, fc1_w, fc2_w, *saved = ctx.saved_tensors
        grads = adaln_block_backward(dout.contiguous(), x, y, ln_w, ln_b, mod_w, fc1_w, fc2_w, tuple(saved))
        return (*grads, None, None, None)


# ----------------------------------------------------------------------------- reference
def adaln_block_reference(
    x_NW: torch.Tensor,
    y_NW: torch.Tensor,
    ln_w_W: torch.Tensor,
    ln_b_W: torch.Tensor,
    mod_w_3WW: torch.Tensor,
    mod_b_3W: torch.Tensor,
    fc1_w_WW: torch.Tensor,
    fc1_b_W: torch.Tensor,
    fc2_w_WW: torch.Tensor,
    fc2_b_W: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Plain PyTorch AdaLN residual block (the CPU path and the kernels' oracle)."""
    shift, scale, gate = F.linear(F.silu(y_NW), mod_w_3WW, mod_b_3W).chunk(3, dim=-1)
    h = F.layer_norm(x_NW, (x_NW.shape[-1],), ln_w_W, ln_b_W, eps) * (1 + scale) + shift
    h = F.linear(F.silu(F.linear(h, fc1_w_WW, fc1_b_W)), fc2_w_WW, fc2_b_W)
    return x_NW + gate * h


# ----------------------------------------------------------------------------- public op
def _check_shapes(x, y, ln_w, ln_b, mod_w, mod_b, fc1_w, fc1_b, fc2_w, fc2_b) -> None:
    W = x.shape[-1]
    expected = {
        "y_NW": (tuple(x.shape), y),
        "ln_w_W": ((W,), ln_w),
        "ln_b_W": ((W,), ln_b),
        "mod_w_3WW": ((3 * W, W), mod_w),
        "mod_b_3W": ((3 * W,), mod_b),
        "fc1_w_WW": ((W, W), fc1_w),
        "fc1_b_W": ((W,), fc1_b),
        "fc2_w_WW": ((W, W), fc2_w),
        "fc2_b_W": ((W,), fc2_b),
    }
    for name, (shape, t) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(
                f"adaln_block: {name} has shape {tuple(t.shape)}; expected {shape} for x of shape "
                f"{tuple(x.shape)} (nn.Linear weights are (out, in))"
            )


def adaln_block(
    x_NW: torch.Tensor,
    y_NW: torch.Tensor,
    ln_w_W: torch.Tensor,
    ln_b_W: torch.Tensor,
    mod_w_3WW: torch.Tensor,
    mod_b_3W: torch.Tensor,
    fc1_w_WW: torch.Tensor,
    fc1_b_W: torch.Tensor,
    fc2_w_WW: torch.Tensor,
    fc2_b_W: torch.Tensor,
    eps: float = 1e-6,
    variant: str = DEFAULT_VARIANT,
) -> torch.Tensor:
    """out = x + gate·fc2(SiLU(fc1(LN(x)(1+scale)+shift))), (shift, scale, gate) from SiLU(y).

    x and y are (..., W); leading dims are flattened for the kernels. Triton runs for CUDA tensors
    (or when forced, see `dispatch`); y and the parameters in another dtype than x (fp32 master
    weights or an fp32 condition with bf16 activations) are cast to x's dtype, the cast's
    backward returns their grads in their own dtype. `variant` picks the forward kernels'
    program order ("grouped", default, or "baseline"; see `adaln_block_forward`).
    """
    args = (x_NW, y_NW, ln_w_W, ln_b_W, mod_w_3WW, mod_b_3W, fc1_w_WW, fc1_b_W, fc2_w_WW, fc2_b_W)
    if x_NW.dim() < 1:
        raise ValueError(f"adaln_block: x must be (..., W), got a {x_NW.dim()}-dim tensor")
    _check_shapes(*args)
    _check_variant(variant)
    if not use_triton(*args):
        return adaln_block_reference(*args, eps=eps)
    W = x_NW.shape[-1]
    dt = x_NW.dtype
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"adaln_block: Triton path supports float32/float16/bfloat16, got {dt}")
    # y is cast too: the backward's GEMMs (dmod_w = dmodᵀ @ SiLU(y)) need one dtype.
    flat = [x_NW.reshape(-1, W), y_NW.to(dt).reshape(-1, W)] + [t.to(dt) for t in args[2:]]
    flat = [t.contiguous() for t in flat]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    out = AdaLNBlockFunction.apply(*flat, float(eps), save, variant)
    return out.reshape(x_NW.shape)


# ----------------------------------------------------------------------------- benchmarks
def make_inputs(
    device: torch.device | str,
    dtype: torch.dtype,
    N: int = 64 * 256 * 4,
    W: int = 1024,
    requires_grad: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs for `adaln_block(**inputs)` (GPU suite and benchmarks). Weights are scaled
    like nn.Linear's init and the modulation is non-zero (the real init is zero, which would
    make the block an identity and hide errors)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = W**-0.5
    specs = {  # name: (shape, std, mean)
        "x_NW": ((N, W), 1.0, 0.0),
        "y_NW": ((N, W), 1.0, 0.0),
        "ln_w_W": ((W,), 0.1, 1.0),
        "ln_b_W": ((W,), 0.1, 0.0),
        "mod_w_3WW": ((3 * W, W), s, 0.0),
        "mod_b_3W": ((3 * W,), 0.1, 0.0),
        "fc1_w_WW": ((W, W), s, 0.0),
        "fc1_b_W": ((W,), 0.1, 0.0),
        "fc2_w_WW": ((W, W), s, 0.0),
        "fc2_b_W": ((W,), 0.1, 0.0),
    }
    return {
        name: (torch.randn(*shape, generator=g) * std + mean)
        .to(device=device, dtype=dtype)
        .requires_grad_(requires_grad)
        for name, (shape, std, mean) in specs.items()
    }


def flops(x_NW: torch.Tensor, **_) -> int:
    """Forward FLOPs counted by the benchmarks: 2·N·W·(3W + 2W) (the three GEMMs; the LN,
    SiLU and modulation are O(N·W) and left out). Backward is twice this."""
    W = x_NW.shape[-1]
    return 2 * x_NW.numel() * (3 * W + 2 * W)


def bytes_moved(x_NW: torch.Tensor, save: bool = False, **_) -> int:
    """Forward HBM bytes of the three kernels: x, y read; h0, gate, a1 written and re-read; x
    re-read for the residual; out written; weights read once (re-reads per row block hit L2).
    `save` adds the training-only stores (scale, h2, mean/rstd)."""
    N, W = x_NW.reshape(-1, x_NW.shape[-1]).shape
    e = x_NW.element_size()
    acts = (2 + 2 + 2 + 2 + 1 + 1) * N * W  # x,y | h0 w+r | gate w+r | a1 w+r | x again | out
    weights = 3 * W * W + 3 * W + 2 * W * W + 4 * W
    extra = (2 * N * W) * e + 2 * N * 4 if save else 0
    return (acts + weights) * e + extra
