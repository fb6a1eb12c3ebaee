"""Mask-ratio samplers reproduce docs/design.md §1.7's realised statistics; masked counts and orders."""

import math

import numpy as np
import pytest
import torch

from dream_fast.config import MaskConfig
from dream_fast.model.masking import mask_mu, num_masked, random_orders, sample_mask_ratio, split_order


def _draws(cfg: MaskConfig, epoch: float, n: int = 20000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.array([sample_mask_ratio(cfg, epoch, rng) for _ in range(n)])


@pytest.mark.parametrize("epoch,expected", [(0.0, 0.338), (18.0, 0.500), (36.0, 0.662)])
def test_warmup_mean_matches_design(epoch, expected):
    cfg = MaskConfig()  # mu 0 -> 1 over epochs 0..36, sigma 0.45
    r = _draws(cfg, epoch)
    assert abs(r.mean() - expected) < 0.01
    assert r.min() >= 0.0 and r.max() <= 1.0


def test_warmup_tail_probabilities_at_mu_one():
    r = _draws(MaskConfig(), 48.0)
    assert abs((r >= 0.5).mean() - 0.753) < 0.01
    assert abs((r <= 0.75).mean() - 0.567) < 0.01


def test_mu_schedule_linear_and_cosine():
    cfg = MaskConfig()
    assert mask_mu(cfg, -1) == 0.0 and mask_mu(cfg, 18) == pytest.approx(0.5) and mask_mu(cfg, 40) == 1.0
    cos = MaskConfig(shape="cosine")
    assert mask_mu(cos, 9) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.25)))


def test_fluid_baseline_range_and_mean():
    r = _draws(MaskConfig(schedule="fluid"), 0.0, 5000)
    assert r.min() >= 0.7 and r.max() <= 1.0
    # TruncNormal(1, 0.25) on [0.7, 1]: mean = 1 - 0.25 * phi(0)... computed independently
    from scipy.stats import norm
    a = (0.7 - 1.0) / 0.25
    expected = 1.0 + 0.25 * (norm.pdf(a) - norm.pdf(0)) / (norm.cdf(0) - norm.cdf(a))
    assert abs(r.mean() - expected) < 0.01


def test_one_ratio_per_call_and_ceil_count():
    rng = np.random.default_rng(1)
    r = sample_mask_ratio(MaskConfig(), 10.0, rng)
    assert isinstance(r, float)
    for L in (64, 256, 37):
        for ratio in (0.0, 0.1, 0.5, 0.51, 0.999, 1.0):
            assert num_masked(ratio, L) == math.ceil(L * ratio)


def test_orders_are_permutations_and_split():
    g = torch.Generator().manual_seed(0)
    order = random_orders(5, 37, generator=g)
    assert torch.equal(order.sort(dim=1).values, torch.arange(37).expand(5, -1))
    masked, keep = split_order(order, 10)
    assert masked.shape == (5, 10) and keep.shape == (5, 27)
    assert not (set(masked[0].tolist()) & set(keep[0].tolist()))
