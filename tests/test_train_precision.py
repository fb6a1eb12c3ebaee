"""train.precision "auto": which precision a run gets, and a bf16 CPU run training like fp32."""

from __future__ import annotations

import pytest
import torch

from dream_fast.config import ConfigError, get_preset, load_config
from dream_fast.train import engine as engine_mod
from dream_fast.train.engine import resolve_precision

CPU = torch.device("cpu")


def _cfg(precision: str, **train):
    cfg = get_preset("tiny")
    cfg.train.precision = precision
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(explicit):
    assert resolve_precision(_cfg(explicit), CPU) == explicit


@pytest.mark.parametrize("speedup, want", [(3.0, "bf16"), (1.49, "fp32"), (0.3, "fp32")])
def test_auto_on_cpu_follows_the_measured_bf16_speedup(monkeypatch, speedup, want):
    monkeypatch.setattr(engine_mod, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_precision(_cfg("auto"), CPU) == want


def test_auto_on_cpu_under_deepspeed_is_fp32_without_measuring(monkeypatch):
    def boom():
        raise AssertionError("ranks must not each measure: they could disagree")

    monkeypatch.setattr(engine_mod, "cpu_bf16_speedup", boom)
    assert resolve_precision(_cfg("auto", zero_stage=2), CPU) == "fp32"
    assert resolve_precision(_cfg("auto"), CPU, world_size=2) == "fp32"


def test_measured_speedup_is_a_positive_ratio():
    s = engine_mod.cpu_bf16_speedup(n=64)
    assert s > 0 and s == engine_mod.cpu_bf16_speedup(n=64)  # cached: measured once per process


def test_tiny_preset_is_auto_and_bad_values_are_named(tmp_path):
    assert get_preset("tiny").train.precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["train.precision=bf17"], "tiny")


def test_bf16_autocast_step_on_cpu_tracks_fp32():
    """One optimizer step of the tiny model under CPU bf16 autocast moves the loss like fp32 does."""
    from dream_fast.model.dream import build_model
    from dream_fast.model.masking import random_orders

    cfg = get_preset("tiny")
    m = cfg.model
    B, L = 8, m.seq_len
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, L, m.token_dim, generator=g)
    ids = torch.randint(3, m.vocab_size, (B, m.text_context), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    order = random_orders(B, L, generator=torch.Generator().manual_seed(1))
    losses = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(m, cfg.loss)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")
        with amp:
            out = model(tokens, ids, L // 2 + 8, order, generator=torch.Generator().manual_seed(2))
        assert out["loss"].dtype == torch.float32  # losses leave autocast in fp32
        losses[prec] = out["loss"].item()
        out["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(gr.dtype == torch.float32 and torch.isfinite(gr).all() for gr in grads)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
