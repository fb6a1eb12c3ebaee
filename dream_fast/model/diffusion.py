"""Gaussian diffusion for the per-token head: improved-DDPM tables, ε + learned-range-variance loss,
respaced ancestral sampling with classifier-free guidance (docs/design.md §1.5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

ModelFn = Callable[..., torch.Tensor]  # model_fn(x_NC, t_N, **kwargs) -> (N, 2C) = [eps, v]

SCHEDULES = ("cosine", "linear")
# Per-timestep weights of the ε-MSE: "eps" is MAR's plain ε-MSE; "v" multiplies it by 1/ᾱ_t, which is
# the v-prediction loss (|Δv|² = |Δε|²/ᾱ_t) and weighs x0 errors by SNR + 1 instead of SNR, so noisy
# timesteps still teach the condition z what the token looks like. Capped at V_WEIGHT_MAX (ᾱ_t → 0).
WEIGHTINGS = ("eps", "v")
V_WEIGHT_MAX = 100.0


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"diffusion loss weighting {weighting!r} unknown; allowed: {list(WEIGHTINGS)}")

# Columns of step_table(), in the order guided_ddpm_step reads them.
STEP_TABLE_COLUMNS = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "log_beta",
    "nonzero",
)
_TABLES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "timestep_map",
)


# ----------------------------------------------------------------------------- schedules


def cosine_alpha_bar(t_over_T: np.ndarray | float) -> np.ndarray:
    """ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2) for s = t/T in [0, 1] (Nichol & Dhariwal)."""
    return np.cos((np.asarray(t_over_T, dtype=np.float64) + 0.008) / 1.008 * math.pi / 2) ** 2


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """β_0..β_{T-1} in float64. cosine: β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999); linear: scaled DDPM."""
    if schedule == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = cosine_alpha_bar(steps)
        return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
    if schedule == "linear":
        # The DDPM range (1e-4 .. 0.02 for T = 1000), stretched so other T give a similar total noise.
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(f"noise schedule {schedule!r} unknown; allowed: {list(SCHEDULES)}")


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Kept original steps when respacing T steps to num_steps evenly spaced ones (first and last kept)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"respacing must be in [1, num_timesteps={num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (num_steps - 1)
    kept = sorted({round(i * stride) for i in range(num_steps)})
    if len(kept) != num_steps:  # cannot happen for num_steps <= T, kept as a guard
        raise ValueError(f"cannot respace {num_timesteps} steps into {num_steps} distinct steps")
    return kept


# ----------------------------------------------------------------------------- helpers


def _gather(table_S: torch.Tensor, t_N: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped (N, 1, ...) to broadcast against `like` (N, ...)."""
    out = table_S[t_N].to(like.dtype)
    return out.reshape(out.shape[0], *([1] * (like.dim() - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of Φ, as in improved-DDPM (keeps the decoder NLL numerically identical to it)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) for x in [-1, 1] quantised to 256 bins under N(mean, e^{2·log_scale}); elementwise nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the edge bins absorb the tails
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def ddpm_step_reference(
    out_cond_N2C: torch.Tensor,
    out_uncond_N2C: torch.Tensor,
    x_NC: torch.Tensor,
    noise_NC: torch.Tensor,
    coef_7: torch.Tensor,
    cfg_N: torch.Tensor,
    temperature: float | torch.Tensor,
) -> torch.Tensor:
    """One guided ancestral step from a step_table() row; the math of kernels/guided_ddpm_step.

    eps = eps_u + cfg·(eps_c − eps_u); the variance output comes from the cond half.
    """
    C = x_NC.shape[-1]
    c0, c1, k1, k2, post_logvar, log_beta, nonzero = coef_7.to(torch.float32).unbind(0)
    out_c = out_cond_N2C.float()
    eps_u = out_uncond_N2C[:, :C].float()
    eps = eps_u + cfg_N.float().reshape(-1, 1) * (out_c[:, :C] - eps_u)
    frac = (out_c[:, C:] + 1.0) * 0.5
    logvar = frac * log_beta + (1.0 - frac) * post_logvar
    x = x_NC.float()
    x0 = c0 * x - c1 * eps
    mean = k1 * x0 + k2 * x
    return (mean + nonzero * torch.exp(0.5 * logvar) * noise_NC.float() * temperature).to(x_NC.dtype)


def _resolve_step_op() -> Callable[..., torch.Tensor]:
    """The fused kernel when kernels/guided_ddpm_step.py is installed, else the local reference."""
    try:
        from dream_fast.kernels.guided_ddpm_step import guided_ddpm_step
    except ImportError:
        return ddpm_step_reference
    return guided_ddpm_step


# ----------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Discrete Gaussian diffusion with improved-DDPM tables (float64 math, float32 torch tables).

    With `respacing=S` the process keeps S evenly spaced steps of the T-step schedule; index i of
    every table is the respaced step and `timestep_map[i]` the original t fed to the model.
    """

    def __init__(self, num_timesteps: int = 1000, schedule: str = "cosine", respacing: int | None = None):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"noise schedule {schedule!r} unknown; allowed: {list(SCHEDULES)}")
        self.original_num_timesteps = num_timesteps
        self.schedule = schedule
        base_betas = make_betas(schedule, num_timesteps)
        if respacing is None or respacing == num_timesteps:
            kept = list(range(num_timesteps))
            betas = base_betas
        else:
            if respacing < 2:
                raise ValueError(
                    f"respacing must be >= 2 steps (or None for all {num_timesteps}), got {respacing}"
                )
            kept = space_timesteps(num_timesteps, respacing)
            abar = np.cumprod(1.0 - base_betas)
            kept_abar = abar[kept]
            # β'_i = 1 − ᾱ(k_i)/ᾱ(k_{i−1}) so that the respaced ᾱ equals the original at kept steps
            betas = 1.0 - kept_abar / np.concatenate([[1.0], kept_abar[:-1]])
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.concatenate([[1.0], acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        tables64 = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": acp,
            "alphas_cumprod_prev": acp_prev,
            "sqrt_alphas_cumprod": np.sqrt(acp),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1.0),
            "posterior_variance": post_var,
            # the posterior variance is 0 at t = 0: reuse the t = 1 value so the log stays finite
            "posterior_log_variance_clipped": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
            "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
            "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
        }
        self.tables64 = tables64  # float64 numpy copies, for tests and analysis
        for name, arr in tables64.items():
            setattr(self, name, torch.from_numpy(arr).to(torch.float32))
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self._step_table = self._build_step_table()

    # -- device ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Move every table to `device` (in place); returns self."""
        for name in _TABLES:
            setattr(self, name, getattr(self, name).to(device))
        self._step_table = self._step_table.to(device)
        return self

    # -- forward process ------------------------------------------------------------------
    def q_sample(
        self, x0: torch.Tensor, t_N: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · noise."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _gather(self.sqrt_alphas_cumprod, t_N, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t_N, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t_N: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x0)."""
        mean = (
            _gather(self.posterior_mean_coef1, t_N, xt) * x0
            + _gather(self.posterior_mean_coef2, t_N, xt) * xt
        )
        var = _gather(self.posterior_variance, t_N, xt).expand_as(xt)
        logvar = _gather(self.posterior_log_variance_clipped, t_N, xt).expand_as(xt)
        return mean, var, logvar

    # -- reverse process ------------------------------------------------------------------
    def p_mean_variance(self, model_output_N2C: torch.Tensor, x: torch.Tensor, t_N: torch.Tensor) -> dict:
        """p(x_{t−1} | x_t) from model output [eps, v], learned-range variance; x0 from eps, unclipped."""
        C = x.shape[1]
        if model_output_N2C.shape[1] != 2 * C:
            raise ValueError(
                f"model output must be (N, 2C) = [eps, v] with C={C}, got {tuple(model_output_N2C.shape)}"
            )
        eps, v = model_output_N2C.float().split(C, dim=1)
        x = x.float()
        frac = (v + 1.0) * 0.5
        min_log = _gather(self.posterior_log_variance_clipped, t_N, x)
        max_log = _gather(self.log_betas, t_N, x)
        log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = (
            _gather(self.sqrt_recip_alphas_cumprod, t_N, x) * x
            - _gather(self.sqrt_recipm1_alphas_cumprod, t_N, x) * eps
        )
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x, t_N)
        return {
            "mean": mean,
            "variance": torch.exp(log_var),
            "log_variance": log_var,
            "pred_x0": pred_x0,
            "eps": eps,
        }

    # -- training -------------------------------------------------------------------------
    def training_losses(
        self,
        model_fn: ModelFn,
        x0_NC: torch.Tensor,
        t_N: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        weighting: str = "eps",
    ) -> dict[str, torch.Tensor]:
        """Per-row losses (N,): loss = w_t · mse + vb; mse is the plain ε-MSE (mean over channels),
        w_t = 1 (weighting "eps") or min(1/ᾱ_t, V_WEIGHT_MAX) ("v"); vb in bits (mean frozen, only
        the variance v learns): KL(q(x_{t−1}|x_t,x0) || p(x_{t−1}|x_t)) for t > 0, −log p(x0|x1) at t = 0.
        """
        check_weighting(weighting)
        model_kwargs = model_kwargs or {}
        x0 = x0_NC.float()
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t_N, noise)
        out = model_fn(x_t, self.timestep_map[t_N], **model_kwargs).float()
        C = x0.shape[1]
        eps, v = out.split(C, dim=1)
        mse = _mean_flat((noise - eps) ** 2)
        # the VLB trains the variance only: the mean it sees is built from a detached ε
        vb = self._vb_bits(torch.cat([eps.detach(), v], dim=1), x0, x_t, t_N)
        weighted = mse
        if weighting == "v":
            weighted = mse * (1.0 / self.alphas_cumprod[t_N]).clamp(max=V_WEIGHT_MAX)
        return {"loss": weighted + vb, "mse": mse, "vb": vb}

    def _vb_bits(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t_N: torch.Tensor):
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t_N)
        p = self.p_mean_variance(model_output, x_t, t_N)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t_N == 0, nll, kl)

    # -- sampling -------------------------------------------------------------------------
    def _build_step_table(self) -> torch.Tensor:
        nonzero = (np.arange(self.num_timesteps) != 0).astype(np.float64)
        cols = [self.tables64[c] for c in STEP_TABLE_COLUMNS[:5]]
        cols += [np.log(self.tables64["betas"]), nonzero]
        return torch.from_numpy(np.stack(cols, axis=1)).to(torch.float32)

    def step_table(self) -> torch.Tensor:
        """(S, 7) float32 rows indexed by respaced step, columns STEP_TABLE_COLUMNS."""
        return self._step_table

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape: tuple[int, int],
        noise: torch.Tensor | None = None,
        temperature: float | torch.Tensor = 1.0,
        cfg: torch.Tensor | float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ancestral DDPM over all (respaced) steps → x0 (N, C). Temperature scales injected noise only.

        cfg None: model_fn(x_NC, t_N) -> (N, 2C). cfg given (float or (N,)): model_fn sees the doubled
        batch [x; x] with [t; t] and returns [cond; uncond] (2N, 2C); both halves share x and noise,
        ε is guided and the cond half's variance is used. No host syncs inside the loop.
        """
        model_kwargs = model_kwargs or {}
        N, C = shape
        device = (
            torch.device(device)
            if device is not None
            else (noise.device if noise is not None else self.device)
        )
        if self.device != device:
            self.to(device)
        if noise is None:
            x = torch.randn(N, C, device=device, generator=generator)
        else:
            if tuple(noise.shape) != (N, C):
                raise ValueError(f"noise must have shape {(N, C)}, got {tuple(noise.shape)}")
            x = noise.float()
        if cfg is None:
            cfg_N = torch.ones(N, device=device)
        else:
            cfg_N = torch.as_tensor(cfg, dtype=torch.float32, device=device).reshape(-1).expand(N)
        step = _resolve_step_op()
        table = self._step_table
        # model timestep per loop iteration, reversed, precomputed on device (no per-step host work)
        t_model_S = self.timestep_map.flip(0)
        indices = range(self.num_timesteps)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, total=self.num_timesteps)
        for k in indices:
            i = self.num_timesteps - 1 - k
            t_in = t_model_S[k].expand(N if cfg is None else 2 * N)
            step_noise = torch.randn(N, C, device=device, generator=generator)
            if cfg is None:
                out = model_fn(x, t_in, **model_kwargs)
                out_c, out_u = out, out
            else:
                out = model_fn(torch.cat([x, x], dim=0), t_in, **model_kwargs)
                out_c, out_u = out[:N], out[N:]
            x = step(out_c, out_u, x, step_noise, table[i], cfg_N, temperature)
        return x
