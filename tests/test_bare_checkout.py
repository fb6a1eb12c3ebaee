"""The GPU image's conditions on CPU: a plain copy of the tree (no install), optional packages missing.

The H200 image (docs/gpu.md) has torch, triton, numpy, transformers, safetensors and tokenizers, no
deepspeed/diffusers/webdataset/flash-attn/xformers, and runs `PYTHONPATH=. python3 -m
benchmarks.gpu_suite` from the checkout. Here a subprocess gets a copy of the files git would
check out, a clean environment with PYTHONPATH=<copy> only, the editable install's finder removed,
and an import hook that makes the optional packages (and transformers, scipy, PIL, which only
some paths use) unimportable. It imports the model, sampler, kernels and GPU suite from the copy,
runs one training forward/backward and one sampling call of the tiny preset.
"""

from __future__ import annotations

import textwrap

import pytest
from bare_helpers import BLOCKED, make_bare, run_bare

PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    here = Path.cwd().resolve()
    import dream_fast.kernels
    import dream_fast.kernels.adaln_block
    import dream_fast.model
    import dream_fast.sampling
    import benchmarks.gpu_suite
    for mod in (dream_fast.kernels, dream_fast.kernels.adaln_block, dream_fast.model, benchmarks.gpu_suite):
        assert Path(mod.__file__).resolve().is_relative_to(here), (mod.__name__, mod.__file__)
    assert set(dream_fast.kernels.OPS) <= set(benchmarks.gpu_suite.discover_ops()), "ops not discovered"
    for name in BLOCKED:
        assert name not in sys.modules, f"{name} was imported"
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{name} should be unimportable here")

    from dream_fast.config import get_preset
    from dream_fast.model.dream import build_model
    from dream_fast.model.masking import num_masked, random_orders
    from dream_fast.sampling.sampler import DreamSampler, draw_noise

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    m = cfg.model
    m.enc_depth = m.dec_depth = 1
    m.num_sampling_steps = 4
    model = build_model(m, cfg.loss)
    B, L = 2, m.seq_len
    tokens = torch.randn(B, L, m.token_dim)
    ids = torch.full((B, m.text_context), 2, dtype=torch.long)
    ids[:, 0] = 1
    out = model(tokens, ids, num_masked(0.75, L), random_orders(B, L, torch.device("cpu")))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]), out
    model.eval()
    with torch.no_grad():
        _, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
        noise = draw_noise([0, 1], 1, L, m.token_dim, m.num_sampling_steps)
        res = DreamSampler(model).sample(cond, noise, steps=2, cfg=2.0)
    assert res.tokens_BLC.shape == (B, L, m.token_dim) and torch.isfinite(res.tokens_BLC).all()
    print("BARE_OK", float(out["loss"]))
    """
)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    return make_bare(tmp_path_factory.mktemp("bare"))


def test_bare_checkout_imports_and_runs_without_optional_packages(bare):
    root, site = bare
    assert not (root / ".venv").exists() and not list(root.glob("*.egg-info"))
    r = run_bare(["-c", f"BLOCKED = {BLOCKED!r}\n" + PROBE], root, site)
    assert r.returncode == 0 and "BARE_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
