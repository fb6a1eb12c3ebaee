"""Tests for dream_fast.model.diffusion: schedules against closed forms and diffusers, respacing,
posterior algebra, learned-range VLB branches, the step-table update and the sampling loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dream_fast.model.diffusion import (
    STEP_TABLE_COLUMNS,
    GaussianDiffusion,
    _resolve_step_op,
    ddpm_step_reference,
)


def _abar_closed(s):
    return np.cos((np.asarray(s, dtype=np.float64) + 0.008) / 1.008 * math.pi / 2) ** 2


# ----------------------------------------------------------------------------- schedules


def test_cosine_betas_match_diffusers_and_closed_form():
    from diffusers import DDPMScheduler

    d = GaussianDiffusion(1000, "cosine")
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas
    torch.testing.assert_close(d.betas, ref.float(), atol=1e-6, rtol=0)
    # ᾱ_t (index t = after t+1 noising steps) = ᾱ((t+1)/T)/ᾱ(0); only the last β is clipped at 0.999
    T = 1000
    want = _abar_closed(np.arange(1, T + 1) / T) / _abar_closed(0.0)
    np.testing.assert_allclose(d.tables64["alphas_cumprod"][:-1], want[:-1], rtol=1e-9)
    assert d.tables64["betas"][-1] == pytest.approx(0.999)
    assert np.all(d.tables64["betas"][:-1] < 0.999)


def test_linear_schedule_is_scaled_ddpm_range():
    T = 500  # scale 2: β from 2e-4 to 0.04
    d = GaussianDiffusion(T, "linear")
    t = np.arange(T)
    want = 2e-4 + t * (0.04 - 2e-4) / (T - 1)
    np.testing.assert_allclose(d.tables64["betas"], want, rtol=1e-12)
    assert d.alphas_cumprod[-1] < 1e-3  # nearly pure noise at t = T-1


def test_bad_schedule_and_respacing_raise():
    with pytest.raises(ValueError, match="cosine"):
        GaussianDiffusion(100, "quadratic")
    with pytest.raises(ValueError, match="respacing"):
        GaussianDiffusion(100, "cosine", respacing=101)


def test_respacing_keeps_evenly_spaced_steps_and_their_alpha_bar():
    base = GaussianDiffusion(1000, "cosine")
    r = GaussianDiffusion(1000, "cosine", respacing=100)
    assert r.num_timesteps == 100
    kept = r.timestep_map.numpy()
    np.testing.assert_array_equal(kept, np.round(np.linspace(0, 999, 100)).astype(np.int64))
    assert kept[0] == 0 and kept[-1] == 999
    np.testing.assert_allclose(r.tables64["alphas_cumprod"], base.tables64["alphas_cumprod"][kept], rtol=1e-9)
    # each respaced step merges ~10 original ones, so its β exceeds the single-step β it ends on
    assert bool((r.betas[1:] > base.betas[kept[1:]]).all())


# ----------------------------------------------------------------------------- forward / posterior


def test_q_sample_and_posterior_match_float64_closed_forms():
    torch.manual_seed(0)
    T = 200
    d = GaussianDiffusion(T, "cosine")
    betas = np.minimum(1 - _abar_closed(np.arange(1, T + 1) / T) / _abar_closed(np.arange(T) / T), 0.999)
    abar = np.cumprod(1 - betas)
    N, C = 6, 5
    x0 = torch.randn(N, C, dtype=torch.float64)
    xt_in = torch.randn(N, C, dtype=torch.float64)
    noise = torch.randn(N, C, dtype=torch.float64)
    t = torch.tensor([0, 1, 7, 50, 150, 199])

    a = torch.from_numpy(abar[t.numpy()])[:, None]
    torch.testing.assert_close(
        d.q_sample(x0.float(), t, noise.float()).double(),
        a.sqrt() * x0 + (1 - a).sqrt() * noise,
        atol=1e-5,
        rtol=0,
    )

    # posterior by Bayes: q(x_{t-1}|x0) = N(√ā' x0, 1-ā'), q(x_t|x_{t-1}) = N(√α x_{t-1}, β)
    tn = t.numpy()
    ap = np.where(tn > 0, abar[np.maximum(tn - 1, 0)], 1.0)
    b, al = betas[tn], 1 - betas[tn]
    prec = np.where(tn > 0, 1 / np.maximum(1 - ap, 1e-300), np.inf) + al / b
    var = 1 / prec
    ap_t, al_t, b_t, var_t = (torch.from_numpy(v)[:, None] for v in (ap, al, b, var))
    mean = var_t * (
        torch.where(ap_t < 1, ap_t.sqrt() / (1 - ap_t).clamp_min(1e-300), 0 * ap_t) * x0
        + al_t.sqrt() / b_t * xt_in
    )
    mean = torch.where(torch.from_numpy(tn == 0)[:, None], x0, mean)  # t=0: the posterior is x0 itself
    m, v, logv = d.q_posterior_mean_variance(x0.float(), xt_in.float(), t)
    torch.testing.assert_close(m.double(), mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.double(), var_t.expand(N, C), atol=1e-9, rtol=1e-5)
    # clipped log-variance: log var except at t=0, where the t=1 value stands in for log 0
    want_log = np.log(np.where(tn == 0, betas[1] * (1 - abar[0]) / (1 - abar[1]), np.maximum(var, 1e-300)))
    torch.testing.assert_close(logv[:, 0].double(), torch.from_numpy(want_log), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- training losses


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_training_losses_vb_branches_and_frozen_mean():
    torch.manual_seed(1)
    d = GaussianDiffusion(100, "cosine")
    N, C = 4, 3
    x0 = torch.rand(N, C) * 1.6 - 0.8  # inside (-1, 1): the decoder NLL uses the interior bin
    t = torch.tensor([0, 0, 10, 99])
    noise = torch.randn(N, C)
    out = (0.3 * torch.randn(N, 2 * C)).requires_grad_(True)
    seen_t = []

    def model_fn(x, tt):
        seen_t.append(tt.clone())
        return out

    terms = d.training_losses(model_fn, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (N,) and torch.isfinite(v).all() for v in terms.values())
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :C]) ** 2).mean(1))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(seen_t[0], t)  # no respacing: model sees t itself

    # independent float64 re-derivation of both vb branches
    x_t = d.q_sample(x0, t, noise).double()
    eps, v = out.detach().double().split(C, 1)
    acp = torch.from_numpy(d.tables64["alphas_cumprod"])[t][:, None]
    acp_prev = torch.from_numpy(d.tables64["alphas_cumprod_prev"])[t][:, None]
    beta = torch.from_numpy(d.tables64["betas"])[t][:, None]
    pv1 = d.tables64["posterior_variance"][1]
    post_var = beta * (1 - acp_prev) / (1 - acp)
    post_logvar_clip = torch.log(torch.where(t[:, None] == 0, torch.full_like(post_var, pv1), post_var))
    frac = (v + 1) / 2
    logvar = frac * beta.log() + (1 - frac) * post_logvar_clip
    pred_x0 = (x_t - (1 - acp).sqrt() * eps) / acp.sqrt()
    k1 = beta * acp_prev.sqrt() / (1 - acp)
    k2 = (1 - acp_prev) * (1 - beta).sqrt() / (1 - acp)
    mu = k1 * pred_x0 + k2 * x_t
    true_mu = k1 * x0.double() + k2 * x_t
    kl = 0.5 * (
        -1
        + logvar
        - post_logvar_clip
        + (post_logvar_clip - logvar).exp()
        + (true_mu - mu) ** 2 / logvar.exp()
    )
    kl_bits = kl.mean(1) / math.log(2)
    sd = (0.5 * logvar).exp()
    p_bin = _normal_cdf((x0.double() + 1 / 255 - mu) / sd) - _normal_cdf((x0.double() - 1 / 255 - mu) / sd)
    nll_bits = (-p_bin.clamp_min(1e-12).log()).mean(1) / math.log(2)
    vb = terms["vb"].detach().double()
    torch.testing.assert_close(vb[2:], kl_bits[2:], rtol=1e-3, atol=1e-5)
    # improved-DDPM's tanh approximation of Φ is within ~1e-3 of erf: compare loosely
    torch.testing.assert_close(vb[:2], nll_bits[:2], rtol=2e-2, atol=1e-3)
    assert not torch.allclose(vb[:2], kl_bits[:2], rtol=0.1)  # the t=0 rows really took the NLL path

    # vb trains only v (mean frozen); mse trains only eps
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :C].abs().max() == 0 and g_vb[:, C:].abs().max() > 0
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, C:].abs().max() == 0 and g_mse[:, :C].abs().max() > 0


def test_training_losses_feed_original_timesteps_when_respaced():
    d = GaussianDiffusion(1000, "linear", respacing=10)
    seen = []

    def model_fn(x, tt):
        seen.append(tt)
        return torch.zeros(x.shape[0], 2 * x.shape[1])

    d.training_losses(model_fn, torch.zeros(3, 2), torch.tensor([0, 5, 9]))
    torch.testing.assert_close(seen[0], d.timestep_map[torch.tensor([0, 5, 9])])
    assert seen[0][-1] == 999


# ----------------------------------------------------------------------------- step table + sampling


@pytest.mark.parametrize("step", [0, 1, 37, 99])
def test_step_table_row_reproduces_p_mean_variance(step):
    torch.manual_seed(2)
    d = GaussianDiffusion(1000, "cosine", respacing=100)
    table = d.step_table()
    assert table.shape == (100, len(STEP_TABLE_COLUMNS)) and table.dtype == torch.float32
    assert table[0, 6] == 0 and bool((table[1:, 6] == 1).all())
    N, C = 5, 4
    x = torch.randn(N, C)
    out = torch.randn(N, 2 * C)
    out[:, C:] = out[:, C:].clamp(-1, 1)
    noise = torch.randn(N, C)
    p = d.p_mean_variance(out, x, torch.full((N,), step))
    want = p["mean"] + float(step != 0) * torch.exp(0.5 * p["log_variance"]) * noise * 0.7
    for op in {ddpm_step_reference, _resolve_step_op()}:
        got = op(out, out, x, noise, table[step], torch.ones(N), 0.7)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    # guidance: eps combined from two halves, variance from the cond half
    out_u = torch.randn(N, 2 * C)
    cfg = torch.linspace(1.0, 4.0, N)
    guided = out.clone()
    guided[:, :C] = out_u[:, :C] + cfg[:, None] * (out[:, :C] - out_u[:, :C])
    p = d.p_mean_variance(guided, x, torch.full((N,), step))
    want = p["mean"] + float(step != 0) * torch.exp(0.5 * p["log_variance"]) * noise
    got = ddpm_step_reference(out, out_u, x, noise, table[step], cfg, 1.0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def _oracle(base: GaussianDiffusion, x0_C: torch.Tensor):
    """model_fn returning the true ε for data that is always x0 (t is the original timestep)."""

    def model_fn(x, t):
        a = base.alphas_cumprod[t][:, None]
        eps = (x - a.sqrt() * x0_C) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model_fn


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_p_sample_loop_recovers_x0_with_oracle(schedule):
    base = GaussianDiffusion(1000, schedule)
    d = GaussianDiffusion(1000, schedule, respacing=100)
    x0 = torch.tensor([0.5, -0.25, 0.9])
    g = torch.Generator().manual_seed(0)
    x = d.p_sample_loop(_oracle(base, x0), (8, 3), generator=g)
    assert x.shape == (8, 3) and torch.isfinite(x).all()
    torch.testing.assert_close(x, x0.expand(8, 3), atol=2e-3, rtol=0)


def test_p_sample_loop_temperature_zero_is_deterministic_and_finite():
    torch.manual_seed(3)
    d = GaussianDiffusion(1000, "cosine", respacing=100)
    w = torch.randn(3, 6) * 0.1

    def model_fn(x, t):
        return torch.tanh(x @ w)

    a = d.p_sample_loop(
        model_fn, (4, 3), noise=torch.ones(4, 3), temperature=0.0, generator=torch.Generator().manual_seed(1)
    )
    b = d.p_sample_loop(
        model_fn, (4, 3), noise=torch.ones(4, 3), temperature=0.0, generator=torch.Generator().manual_seed(2)
    )
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    c = d.p_sample_loop(
        model_fn, (4, 3), noise=torch.ones(4, 3), temperature=1.0, generator=torch.Generator().manual_seed(2)
    )
    assert not torch.allclose(a, c)


def test_cfg_halves_share_state_and_cfg_one_equals_unguided():
    torch.manual_seed(4)
    d = GaussianDiffusion(1000, "cosine", respacing=20)
    N, C = 3, 2
    w = torch.randn(C + 1, 2 * C) * 0.3

    def head(x, cond_flag):
        return torch.tanh(torch.cat([x, cond_flag], 1) @ w)

    def guided_fn(x2, t2):
        assert x2.shape == (2 * N, C) and t2.shape == (2 * N,)
        torch.testing.assert_close(x2[:N], x2[N:], atol=0, rtol=0)  # one shared state
        flag = torch.cat([torch.ones(N, 1), torch.zeros(N, 1)])
        return head(x2, flag)

    def cond_fn(x, t):
        return head(x, torch.ones(N, 1))

    noise = torch.randn(N, C)
    unguided = d.p_sample_loop(cond_fn, (N, C), noise=noise, generator=torch.Generator().manual_seed(5))
    cfg1 = d.p_sample_loop(
        guided_fn, (N, C), noise=noise, cfg=1.0, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(cfg1, unguided, atol=1e-5, rtol=1e-5)
    cfg3 = d.p_sample_loop(
        guided_fn, (N, C), noise=noise, cfg=torch.full((N,), 3.0), generator=torch.Generator().manual_seed(5)
    )
    assert cfg3.shape == (N, C) and not torch.allclose(cfg3, unguided, atol=1e-3)
