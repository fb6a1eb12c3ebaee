"""train.compile / sample.compile (dream_fast/compile.py): compiled equals eager (loss, gradients,
samples), a new mask ratio does not recompile, bad modes name the allowed values.

The cheap tests trace through Dynamo + AOTAutograd (`DREAM_COMPILE_BACKEND=aot_eager`: the same
graphs, guards, dynamic shapes and recompiles as Inductor, without its C++ code generation, which
takes minutes on a shared 2-core CPU); the `slow` test runs Inductor itself on the head's step.
"""

import copy

import pytest
import torch
from sampling_helpers import prompt_ids, tiny_model

from dream_fast import compile as dcompile
from dream_fast.config import ConfigError, get_preset, load_config
from dream_fast.model.dream import build_model
from dream_fast.model.masking import num_masked, random_orders
from dream_fast.sampling.sampler import DreamSampler, draw_noise


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("DREAM_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    dcompile.reset_counts()
    yield
    torch._dynamo.reset()


def _train_model():
    cfg = get_preset("tiny")
    m = cfg.model
    m.enc_depth = m.dec_depth = 1
    torch.manual_seed(0)
    model = build_model(m, cfg.loss)
    with torch.no_grad():  # the head is zero at init: give its gradients something to carry
        for p in model.diffloss.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cfg, model


def _loss_and_grads(fwd, model, cfg, n_masked, seed=1):
    m = cfg.model
    B, L = 4, m.seq_len
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, L, m.token_dim, generator=g)
    ids = torch.randint(3, m.vocab_size, (B, m.text_context), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    order = random_orders(B, L, generator=g)
    model.zero_grad(set_to_none=True)
    out = fwd(tokens, ids, n_masked, order, generator=torch.Generator().manual_seed(seed + 1))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow  # 12-90 s on the shared 2-core CPU (one graph per graph-break segment)
def test_encoder_new_kept_count_does_not_recompile(aot_eager):
    """The cheap check of the dynamic-shape marking: one compiled encoder serves every kept-token
    count after the first dynamic graph, and equals eager."""
    cfg, model = _train_model()
    model.eval()
    enc = dcompile.compiled(model.encode, "test.encode")
    L, C = cfg.model.seq_len, cfg.model.token_dim
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, L, C, generator=g)
    counts = []
    with torch.no_grad():
        for kept in (16, 24, 40, 9):
            keep = random_orders(2, L, generator=g)[:, :kept]
            torch.testing.assert_close(enc(tokens, keep), model.encode(tokens, keep), atol=1e-5, rtol=1e-5)
            counts.append(dcompile.compile_counts()["test.encode"])
    # the first call compiles one graph per graph-break segment; the second kept count may
    # recompile once into dynamic graphs, later ones reuse them
    assert counts[-1] == counts[1], f"graphs after each kept count: {counts}"


@pytest.mark.slow  # block 73 s, step 194 s under Dynamo + AOTAutograd on the shared 2-core CPU
@pytest.mark.parametrize("mode", ["block", "step"])
def test_train_compiled_equals_eager_and_new_ratio_does_not_recompile(aot_eager, mode):
    cfg, model = _train_model()
    model.train()
    ref = copy.deepcopy(model)
    fwd = dcompile.compile_for_training(model, mode)
    L = cfg.model.seq_len
    counts = []
    for r in (0.75, 0.6, 0.9, 0.7):
        n = num_masked(r, L)
        loss_e, grads_e = _loss_and_grads(ref, ref, cfg, n)
        loss_c, grads_c = _loss_and_grads(fwd, model, cfg, n)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for k in grads_e:
            torch.testing.assert_close(grads_c[k], grads_e[k], atol=1e-5, rtol=1e-4, msg=lambda s, k=k: f"{k}: {s}")
        counts.append(sum(dcompile.compile_counts().values()))
    assert counts[0] > 0, "nothing was compiled"
    # the first new kept-token count may recompile once (dynamic shapes); later ratios reuse it
    assert counts[-1] == counts[1], f"graphs compiled after each ratio: {counts}"


@pytest.mark.slow  # 72 s on the shared 2-core CPU (the head loop is traced step by step)
def test_sampler_compiled_equals_eager(aot_eager):
    cfg, model = tiny_model(depth=1, sampling_steps=3)
    ids = prompt_ids(cfg, 2)
    with torch.no_grad():
        _, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
    m = cfg.model
    noise = draw_noise([1, 2], 1, m.seq_len, m.token_dim, m.num_sampling_steps)
    for mode in ("block", "step"):
        s = DreamSampler(model, compile=mode)
        counts = []
        for steps in (3, 4):  # 4 steps: new kept and predicted token counts at every step
            eager = DreamSampler(model).sample(cond, noise, steps=steps, cfg=3.0).tokens_BLC
            got = s.sample(cond, noise, steps=steps, cfg=3.0).tokens_BLC
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            counts.append(dcompile.compile_counts())
        assert counts[0], f"{mode}: nothing was compiled"
        assert counts[1] == counts[0], f"{mode}: new shapes recompiled: {counts}"


def test_bad_modes_are_named():
    with pytest.raises(ValueError, match="sample.compile='fast' unknown; allowed: 'off'"):
        DreamSampler(tiny_model(depth=1)[1], compile="fast")
    with pytest.raises(ConfigError, match=r"train.compile.*allowed values: \['off', 'block', 'step'\]"):
        load_config(preset="tiny", overrides=["train.compile=whole"])
    with pytest.raises(ConfigError, match=r"sample.compile"):
        load_config(preset="tiny", overrides=["sample.compile=true"])


def test_zero_dropout_skipped_state_dict_unchanged():
    cfg, model = _train_model()
    keys = list(model.state_dict())
    n = dcompile.skip_zero_dropout(model)
    assert n > 0 and not any(type(mod) is torch.nn.Dropout for mod in model.modules())
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_inductor_head_step_equals_eager(monkeypatch):
    """Inductor itself (C++ kernels on CPU) on the smallest unit: the head's DDPM step."""
    monkeypatch.setenv("DREAM_COMPILE_BACKEND", "inductor")
    torch._dynamo.reset()
    cfg, model = tiny_model(depth=1, sampling_steps=3)
    ids = prompt_ids(cfg, 1)
    with torch.no_grad():
        _, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
    m = cfg.model
    noise = draw_noise([4], 1, m.seq_len, m.token_dim, m.num_sampling_steps)
    eager = DreamSampler(model).sample(cond, noise, steps=2, cfg=3.0).tokens_BLC
    got = DreamSampler(model, compile="block").sample(cond, noise, steps=2, cfg=3.0).tokens_BLC
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
