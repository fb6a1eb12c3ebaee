"""Tests of kernels/guided_ddpm_step.py: the Triton kernel against the reference (interpreter or
CUDA), and the public op's CPU path against a DDPM posterior written here from ᾱ_t, ᾱ_{t-1}.

Interpreter tests run in their own process: `TRITON_INTERPRET=1 pytest -m interpreter tests/...`;
tests/conftest.py skips them otherwise and provides `force_triton` (provider + NaN-poisoned outputs).
"""

from __future__ import annotations

import math

import dream_fast.kernels.guided_ddpm_step as gs
import pytest
import torch
from dream_fast.kernels.error_rule import assert_within_rule

FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}  # ≈ an ulp, relative to the output's magnitude


def assert_fa_close(got: torch.Tensor, ref_low: torch.Tensor, ref64: torch.Tensor, dtype) -> None:
    """Kernel error vs fp64 ≤ 2 × the low-precision reference's error + a tiny floor."""
    assert got.dtype == dtype, f"kernel output {got.dtype}, expected {dtype}"
    assert_within_rule("guided_ddpm_step", got, ref_low, ref64, FLOOR[dtype])


def _to64(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and k != "coef_7" else v for k, v in inputs.items()}


# ----------------------------------------------------------------------------- kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,C", [(1, 16), (7, 12), (33, 16), (33, 12)])
def test_kernel_matches_reference(force_triton, kernel_device, N, C, dtype):
    inputs = gs.make_inputs(kernel_device, dtype, N=N, C=C, seed=N * C)
    inputs["temperature"] = 0.8
    out = gs.guided_ddpm_step(**inputs)
    assert_fa_close(
        out, gs.guided_ddpm_step_reference(**inputs), gs.guided_ddpm_step_reference(**_to64(inputs)), dtype
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg_kind", ["scalar_tensor", "expanded", "float"])
def test_kernel_batched_cond_uncond_views_and_tensor_args(force_triton, kernel_device, cfg_kind):
    """cond as the row half of a (2N, 2C) output, strided views, 0-dim/expanded cfg,
    0-dim temperature tensor: all read on the device."""
    N, C = 7, 12
    inputs = gs.make_inputs(kernel_device, torch.float32, N=N, C=C)
    dev = kernel_device
    both = torch.cat([inputs["out_cond_N2C"], inputs["out_uncond_N2C"]])
    inputs["out_cond_N2C"] = both[:N]
    # every operand gets its own row stride, so a kernel that mixes them up fails
    inputs["out_uncond_N2C"] = torch.cat([both[N:], torch.randn(N, 4, device=dev)], 1)[:, : 2 * C]
    inputs["x_NC"] = torch.randn(N, 3 * C, device=dev)[:, :C]
    inputs["noise_NC"] = torch.randn(N, C + 1, device=dev)[:, :C]
    inputs["temperature"] = torch.tensor(0.6, device=dev)
    cfg = torch.tensor(2.5, device=dev)
    inputs["cfg_N"] = {"scalar_tensor": cfg, "expanded": cfg.reshape(1).expand(N), "float": 2.5}[cfg_kind]
    out = gs.guided_ddpm_step(**inputs)
    ref = gs.guided_ddpm_step_reference(**{**inputs, "cfg_N": cfg})
    ref64 = gs.guided_ddpm_step_reference(**_to64({**inputs, "cfg_N": cfg}))
    assert_fa_close(out, ref, ref64, torch.float32)


@pytest.mark.interpreter
def test_kernel_unguided_and_final_step(force_triton, kernel_device):
    """cfg = 1 with out_uncond = out_cond is the plain DDPM update; nonzero = 0 adds no noise."""
    N, C = 7, 16
    inputs = gs.make_inputs(kernel_device, torch.float32, N=N, C=C, cfg=False)
    inputs["cfg_N"] = torch.ones(N, device=kernel_device)
    acp, acp_prev = 0.5, 0.55
    torch.testing.assert_close(gs.guided_ddpm_step(**inputs), _naive_ddpm(inputs, acp, acp_prev))
    inputs["coef_7"] = inputs["coef_7"].clone()
    inputs["coef_7"][6] = 0.0
    no_noise = gs.guided_ddpm_step(**inputs)
    torch.testing.assert_close(no_noise, _naive_ddpm({**inputs, "temperature": 0.0}, acp, acp_prev))


# ----------------------------------------------------------------------------- CPU path
def _coef_row(acp: float, acp_prev: float, nonzero: float = 1.0) -> torch.Tensor:
    beta = 1 - acp / acp_prev
    post_var = beta * (1 - acp_prev) / (1 - acp)
    return torch.tensor(
        [
            1 / math.sqrt(acp),
            math.sqrt(1 / acp - 1),
            beta * math.sqrt(acp_prev) / (1 - acp),
            (1 - acp_prev) * math.sqrt(1 - beta) / (1 - acp),
            math.log(post_var),
            math.log(beta),
            nonzero,
        ],
        dtype=torch.float32,
    )


def _naive_ddpm(inputs: dict, acp: float, acp_prev: float) -> torch.Tensor:
    """Guided ancestral step from ᾱ_t, ᾱ_{t-1}: x̂0 from ε, then the Gaussian posterior q(x_{t-1}|x_t, x̂0)
    (Ho et al. eq. 7), with the learned-range log-variance interpolation of improved DDPM."""
    x = inputs["x_NC"].double()
    C = x.shape[1]
    cond, uncond = inputs["out_cond_N2C"].double(), inputs["out_uncond_N2C"].double()
    cfg = torch.as_tensor(inputs["cfg_N"]).double().reshape(-1, 1)
    eps = uncond[:, :C] + cfg * (cond[:, :C] - uncond[:, :C])
    alpha = acp / acp_prev
    beta = 1 - alpha
    x0 = (x - math.sqrt(1 - acp) * eps) / math.sqrt(acp)
    mean = (math.sqrt(acp_prev) * beta * x0 + math.sqrt(alpha) * (1 - acp_prev) * x) / (1 - acp)
    min_log, max_log = math.log(beta * (1 - acp_prev) / (1 - acp)), math.log(beta)
    frac = (cond[:, C:] + 1) / 2
    sigma = torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
    nonzero = float(inputs["coef_7"][6])
    out = mean + nonzero * sigma * inputs["noise_NC"].double() * float(inputs["temperature"])
    return out.to(inputs["x_NC"].dtype)


def _cpu_inputs(N=6, C=5, acp=0.3, acp_prev=0.36, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(N, 2 * C, generator=g)
    cond[:, C:].uniform_(-1, 1, generator=g)
    return {
        "out_cond_N2C": cond,
        "out_uncond_N2C": torch.randn(N, 2 * C, generator=g),
        "x_NC": torch.randn(N, C, generator=g),
        "noise_NC": torch.randn(N, C, generator=g),
        "coef_7": _coef_row(acp, acp_prev),
        "cfg_N": 1 + 3 * torch.rand(N, generator=g),
        "temperature": 0.9,
    }


@pytest.fixture
def cpu_reference_only(monkeypatch):
    monkeypatch.delenv("DREAM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    class NoKernel:
        def __getitem__(self, grid):
            raise AssertionError("the Triton kernel ran for CPU tensors")

    monkeypatch.setattr(gs, "_guided_ddpm_step_kernel", NoKernel())


def test_cpu_dispatches_to_reference_and_matches_naive(cpu_reference_only):
    inputs = _cpu_inputs()
    torch.testing.assert_close(gs.guided_ddpm_step(**inputs), _naive_ddpm(inputs, 0.3, 0.36))


def test_cfg_one_equals_unguided_update(cpu_reference_only):
    inputs = _cpu_inputs()
    inputs["cfg_N"] = torch.ones(6)
    unguided = gs.guided_ddpm_step(**{**inputs, "out_uncond_N2C": inputs["out_cond_N2C"]})
    torch.testing.assert_close(
        unguided, _naive_ddpm({**inputs, "out_uncond_N2C": inputs["out_cond_N2C"]}, 0.3, 0.36)
    )
    # cfg = 1 ignores whatever the unconditional branch predicted
    torch.testing.assert_close(gs.guided_ddpm_step(**inputs), unguided, rtol=1e-6, atol=1e-6)


def test_final_step_adds_no_noise(cpu_reference_only):
    inputs = _cpu_inputs()
    inputs["coef_7"] = _coef_row(0.3, 0.36, nonzero=0.0)
    a = gs.guided_ddpm_step(**inputs)
    b = gs.guided_ddpm_step(**{**inputs, "noise_NC": 10 * torch.randn(6, 5)})
    assert torch.equal(a, b)
    torch.testing.assert_close(a, _naive_ddpm({**inputs, "temperature": 0.0}, 0.3, 0.36))


def test_temperature_scales_only_the_noise(cpu_reference_only):
    inputs = _cpu_inputs()
    mean = gs.guided_ddpm_step(**{**inputs, "temperature": 0.0})
    full = gs.guided_ddpm_step(**{**inputs, "temperature": 1.0})
    half = gs.guided_ddpm_step(**{**inputs, "temperature": torch.tensor(0.5)})
    torch.testing.assert_close(half - mean, 0.5 * (full - mean), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named(cpu_reference_only):
    inputs = _cpu_inputs()
    with pytest.raises(ValueError, match="coef_7 must hold one step-table row of 7 columns"):
        gs.guided_ddpm_step(**{**inputs, "coef_7": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"out_cond_N2C has shape \(6, 5\); expected \(6, 10\)"):
        gs.guided_ddpm_step(**{**inputs, "out_cond_N2C": torch.zeros(6, 5)})
    with pytest.raises(ValueError, match=r"cfg_N must be \(N,\)"):
        gs.guided_ddpm_step(**{**inputs, "cfg_N": torch.ones(5)})
