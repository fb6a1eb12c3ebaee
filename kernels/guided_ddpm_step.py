"""One ancestral DDPM sampling step with classifier-free guidance, fused into a single kernel.

Reads the head's outputs, x and the noise once, writes x_prev once (no intermediates in memory);
the step's coefficients are read from a device tensor, so the step has no host sync.

Math, per row n and channel c (C = channels; out_* are (N, 2C) = [ε, v] of the diffusion head):

    ε      = ε_u + cfg[n] · (ε_c − ε_u)                        ε_c = out_cond[:, :C], ε_u = out_uncond[:, :C]
    frac   = (v_c + 1) / 2                                      v_c = out_cond[:, C:]
    logvar = frac · log_beta + (1 − frac) · post_logvar_clipped
    x0     = sqrt_recip_acp · x − sqrt_recipm1_acp · ε
    mean   = coef1 · x0 + coef2 · x
    x_prev = mean + nonzero · exp(logvar / 2) · noise · temperature

coef_7 columns, in order: [sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
posterior_mean_coef1, posterior_mean_coef2, posterior_log_variance_clipped, log_beta, nonzero]
(one row of `GaussianDiffusion.step_table()`).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from dream_fast.kernels.dispatch import use_triton

__all__ = ["guided_ddpm_step", "guided_ddpm_step_reference", "make_inputs", "bytes_moved", "COEF_COLUMNS"]

COEF_COLUMNS = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "log_beta",
    "nonzero",
)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _guided_ddpm_step_kernel(
    cond_ptr,
    uncond_ptr,
    x_ptr,
    noise_ptr,
    coef_ptr,
    cfg_ptr,
    temp_ptr,
    out_ptr,
    numel,
    C,
    stride_cond,
    stride_uncond,
    stride_x,
    stride_noise,
    cfg_stride,
    temperature: tl.float32,  # pinned: a torch.compile'd caller may pass the Python float as fp64
    TEMP_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel  # N·C from the host: an int32 product in the kernel could overflow
    row = offs // C
    col = offs % C
    # Seven scalars of the step table, loaded from device memory: no .item() on the host.
    c0 = tl.load(coef_ptr + 0)
    c1 = tl.load(coef_ptr + 1)
    pm1 = tl.load(coef_ptr + 2)
    pm2 = tl.load(coef_ptr + 3)
    post_logvar = tl.load(coef_ptr + 4)
    log_beta = tl.load(coef_ptr + 5)
    nonzero = tl.load(coef_ptr + 6)
    if TEMP_FROM_PTR:
        temperature = tl.load(temp_ptr).to(tl.float32)

    eps_c = tl.load(cond_ptr + row * stride_cond + col, mask=ok, other=0.0).to(tl.float32)
    v_c = tl.load(cond_ptr + row * stride_cond + C + col, mask=ok, other=0.0).to(tl.float32)
    eps_u = tl.load(uncond_ptr + row * stride_uncond + col, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + row * stride_noise + col, mask=ok, other=0.0).to(tl.float32)
    cfg = tl.load(cfg_ptr + row * cfg_stride, mask=ok, other=0.0).to(tl.float32)

    eps = eps_u + cfg * (eps_c - eps_u)
    frac = (v_c + 1.0) * 0.5
    logvar = frac * log_beta + (1.0 - frac) * post_logvar
    x0 = c0 * x - c1 * eps
    mean = pm1 * x0 + pm2 * x
    x_prev = mean + nonzero * tl.exp(0.5 * logvar) * noise * temperature
    tl.store(out_ptr + offs, x_prev.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- reference
def guided_ddpm_step_reference(
    out_cond_N2C: torch.Tensor,
    out_uncond_N2C: torch.Tensor,
    x_NC: torch.Tensor,
    noise_NC: torch.Tensor,
    coef_7: torch.Tensor,
    cfg_N: torch.Tensor,
    temperature: float | torch.Tensor,
) -> torch.Tensor:
    """PyTorch version of the step (computed in fp32 at least, returned in x's dtype)."""
    C = x_NC.shape[-1]
    ct = torch.promote_types(x_NC.dtype, torch.float32)
    coef = coef_7.reshape(7).to(ct)
    c0, c1, pm1, pm2, post_logvar, log_beta, nonzero = coef.unbind(0)
    eps_c, v_c = out_cond_N2C[:, :C].to(ct), out_cond_N2C[:, C:].to(ct)
    eps_u = out_uncond_N2C[:, :C].to(ct)
    cfg = torch.as_tensor(cfg_N, device=x_NC.device).to(ct)
    cfg = cfg[:, None] if cfg.dim() == 1 else cfg
    eps = eps_u + cfg * (eps_c - eps_u)
    frac = (v_c + 1) / 2
    logvar = frac * log_beta + (1 - frac) * post_logvar
    x = x_NC.to(ct)
    mean = pm1 * (c0 * x - c1 * eps) + pm2 * x
    temp = torch.as_tensor(temperature, device=x_NC.device).to(ct)
    return (mean + nonzero * torch.exp(0.5 * logvar) * noise_NC.to(ct) * temp).to(x_NC.dtype)


# ----------------------------------------------------------------------------- public op
def _check(out_cond, out_uncond, x, noise, coef_7, cfg) -> None:
    if x.dim() != 2:
        raise ValueError(f"guided_ddpm_step: x_NC must be 2-D (N, C), got shape {tuple(x.shape)}")
    N, C = x.shape
    for name, t, shape in (
        ("out_cond_N2C", out_cond, (N, 2 * C)),
        ("out_uncond_N2C", out_uncond, None),
        ("noise_NC", noise, (N, C)),
    ):
        if t.dim() != 2 or t.shape[0] != N or (shape is not None and tuple(t.shape) != shape):
            want = shape or f"({N}, ≥{C})"
            raise ValueError(
                f"guided_ddpm_step: {name} has shape {tuple(t.shape)}; expected {want} for x {N, C}"
            )
    if out_uncond.shape[1] < C:
        raise ValueError(
            f"guided_ddpm_step: out_uncond_N2C needs ≥ {C} columns (ε first), got {out_uncond.shape[1]}"
        )
    if coef_7.numel() != 7 or coef_7.shape[-1] != 7:
        raise ValueError(
            f"guided_ddpm_step: coef_7 must hold one step-table row of 7 columns {COEF_COLUMNS}, "
            f"got shape {tuple(coef_7.shape)}"
        )
    if cfg.dim() > 1 or (cfg.dim() == 1 and cfg.shape[0] != N):
        raise ValueError(
            f"guided_ddpm_step: cfg_N must be (N,) = ({N},) or 0-dim, got shape {tuple(cfg.shape)}"
        )


def _row_major(t: torch.Tensor) -> torch.Tensor:
    # Row views such as out[:N] of a batched cond/uncond output keep their row stride; only a
    # non-unit column stride needs a copy.
    return t if t.stride(-1) == 1 else t.contiguous()


def guided_ddpm_step(
    out_cond_N2C: torch.Tensor,
    out_uncond_N2C: torch.Tensor,
    x_NC: torch.Tensor,
    noise_NC: torch.Tensor,
    coef_7: torch.Tensor,
    cfg_N: torch.Tensor | float,
    temperature: float | torch.Tensor,
) -> torch.Tensor:
    """x_prev = DDPM posterior mean of the CFG-guided ε + nonzero·σ·noise·temperature (see module doc).

    `out_uncond_N2C` may be `out_cond_N2C` itself (no guidance); `cfg_N` is (N,) or 0-dim;
    `temperature` a Python float or a 0-dim tensor (read on the device, no sync).
    """
    if not isinstance(cfg_N, torch.Tensor):
        cfg_N = torch.full((), float(cfg_N), dtype=torch.float32, device=x_NC.device)
    _check(out_cond_N2C, out_uncond_N2C, x_NC, noise_NC, coef_7, cfg_N)
    tensors = [out_cond_N2C, out_uncond_N2C, x_NC, noise_NC, coef_7, cfg_N]
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                "guided_ddpm_step: temperature must be a float or a 0-dim tensor, "
                f"got shape {tuple(temperature.shape)}"
            )
        tensors.append(temperature)
    if not use_triton(*tensors):
        return guided_ddpm_step_reference(
            out_cond_N2C, out_uncond_N2C, x_NC, noise_NC, coef_7, cfg_N, temperature
        )

    N, C = x_NC.shape
    cond, uncond, x, noise = (_row_major(t) for t in (out_cond_N2C, out_uncond_N2C, x_NC, noise_NC))
    coef = coef_7.reshape(7).to(torch.float32).contiguous()
    out = _new_output((N, C), x.dtype, x.device)
    temp_is_tensor = isinstance(temperature, torch.Tensor)
    temp_ptr = temperature.reshape(()) if temp_is_tensor else coef  # dummy pointer when unused
    block = 1024
    _guided_ddpm_step_kernel[(triton.cdiv(N * C, block),)](
        cond,
        uncond,
        x,
        noise,
        coef,
        cfg_N,
        temp_ptr,
        out,
        N * C,
        C,
        cond.stride(0),
        uncond.stride(0),
        x.stride(0),
        noise.stride(0),
        cfg_N.stride(0) if cfg_N.dim() == 1 else 0,
        0.0 if temp_is_tensor else float(temperature),
        TEMP_FROM_PTR=temp_is_tensor,
        BLOCK=block,
    )
    return out


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's output buffer comes from here: NaN-filled under DREAM_KERNELS_POISON=1 (tests),
    so any element a kernel forgets to write fails the comparison."""
    if os.environ.get("DREAM_KERNELS_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- benchmarks
def make_inputs(
    device: torch.device | str,
    dtype: torch.dtype,
    N: int = 64 * 256 * 4,
    C: int = 16,
    cfg: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor | float]:
    """Random inputs for `guided_ddpm_step(**inputs)`; coefficients of a mid-schedule step."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out_cond = torch.randn(N, 2 * C, generator=g).clamp_(-3, 3)
    out_cond[:, C:].uniform_(-1, 1, generator=g)  # the variance output lives in [-1, 1]
    acp, acp_prev = 0.5, 0.55
    beta = 1 - acp / acp_prev
    post_var = beta * (1 - acp_prev) / (1 - acp)
    coef = torch.tensor(
        [
            acp**-0.5,
            (1 / acp - 1) ** 0.5,
            beta * acp_prev**0.5 / (1 - acp),
            (1 - acp_prev) * (1 - beta) ** 0.5 / (1 - acp),
            math.log(post_var),
            math.log(beta),
            1.0,
        ],
        dtype=torch.float32,
    )
    out = {
        "out_cond_N2C": out_cond.to(device=device, dtype=dtype),
        "out_uncond_N2C": torch.randn(N, 2 * C, generator=g).to(device=device, dtype=dtype),
        "x_NC": torch.randn(N, C, generator=g).to(device=device, dtype=dtype),
        "noise_NC": torch.randn(N, C, generator=g).to(device=device, dtype=dtype),
        "coef_7": coef.to(device),
        "cfg_N": (1 + 3 * torch.rand(N, generator=g)).to(device),
        "temperature": 1.0,
    }
    if not cfg:
        out["out_uncond_N2C"] = out["out_cond_N2C"]
    return out


def bytes_moved(out_cond_N2C: torch.Tensor, out_uncond_N2C: torch.Tensor, x_NC: torch.Tensor, **_) -> int:
    """HBM bytes of one step: ε_c, v_c, x, noise, x_prev (N·C each), ε_u unless it aliases the cond
    output, cfg (N floats) and the 7 coefficients."""
    N, C = x_NC.shape
    e = x_NC.element_size()
    reads = 4 + (0 if out_uncond_N2C.data_ptr() == out_cond_N2C.data_ptr() else 1)
    return (reads + 1) * N * C * e + N * 4 + 7 * 4
