"""Mask-ratio sampling (Masking Warmup, FLUID baseline) and per-sample random orders.

The ratio is drawn on the host once per micro-batch per rank, so the masked count is a Python
int and every shape downstream is static; orders live on the device (no host sync).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dream_fast.config import MaskConfig


def mask_mu(cfg: MaskConfig, epoch: float) -> float:
    """mu(e) = mu0 + (mu1 - mu0) * shape(clip((e - W0) / (W1 - W0), 0, 1))."""
    span = cfg.warmup_end_epoch - cfg.warmup_start_epoch
    frac = 1.0 if span <= 0 else min(max((epoch - cfg.warmup_start_epoch) / span, 0.0), 1.0)
    if cfg.shape == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return cfg.mu_start + (cfg.mu_end - cfg.mu_start) * frac


def _truncnorm(mu: float, sigma: float, lo: float, hi: float, rng: np.random.Generator, size=None):
    """Truncated normal by inverse CDF: mu + sigma * Phi^-1(U(Phi(a), Phi(b))) (exact, ~50x faster
    than scipy.stats.truncnorm.rvs for one draw)."""
    from scipy.special import ndtr, ndtri  # lazy: the GPU image has no scipy (docs/gpu.md)

    a, b = ndtr((lo - mu) / sigma), ndtr((hi - mu) / sigma)
    u = rng.uniform(a, b, size=size)
    return np.clip(mu + sigma * ndtri(u), lo, hi)


def sample_mask_ratio(cfg: MaskConfig, epoch: float, rng: np.random.Generator) -> float:
    """One mask ratio r in [0, 1] for one micro-batch on one rank."""
    if cfg.schedule == "fixed":
        return float(cfg.fixed_ratio)
    if cfg.schedule == "fluid":
        return float(_truncnorm(cfg.fluid_mean, cfg.fluid_std, cfg.fluid_min, 1.0, rng))
    return float(_truncnorm(mask_mu(cfg, epoch), cfg.mask_ratio_std, 0.0, 1.0, rng))


def num_masked(ratio: float, seq_len: int) -> int:
    """Masked count = ceil(L * r), clamped to [0, L]."""
    return min(max(int(math.ceil(seq_len * ratio - 1e-9)), 0), seq_len)


def random_orders(batch: int, seq_len: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation per sample, int64 (B, L); the first m entries are the masked set."""
    noise = torch.rand(batch, seq_len, device=device, generator=generator)
    return noise.argsort(dim=1)


def split_order(order_BL: torch.Tensor, n_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked_idx_BM, keep_idx_BK): the first n_masked positions of each order are masked."""
    return order_BL[:, :n_masked], order_BL[:, n_masked:]
