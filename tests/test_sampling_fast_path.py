"""Sampler fast path (per-call text keys/values, shared unconditional context, trimmed last decoder
block, batched head modulations) equals the plain eager path (fast=False) for the same seed:
K = 1 and SAD K > 1 (also greedy), batch 1 and > 1, each cfg schedule, guided and unguided."""

import pytest
import torch
from sampling_helpers import NoHostSync, prompt_ids, tiny_model

from dream_fast.sampling.sampler import DreamSampler, draw_noise, make_plan

TOL = dict(atol=2e-4, rtol=2e-4)  # fp32 noise after a few steps of feedback through the tokens


@pytest.fixture(scope="module")
def setup():
    # depth 2: block 0 (shared self-attention) and the last block (trimmed) are different blocks
    cfg, model = tiny_model(depth=2, sampling_steps=8)
    ids = prompt_ids(cfg, 3)
    with torch.no_grad():
        emb, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
    return cfg, model, cond, emb


def _rows(cond, emb, B):
    return type(cond)(cond.tokens[:B], cond.mask[:B]), emb[:B]


def _noise(cfg, B, K, **kw):
    m = cfg.model
    return draw_noise(list(range(5, 5 + B)), K, m.seq_len, m.token_dim, m.num_sampling_steps, **kw)


def _both(model, cond, noise, **kw):
    fast = DreamSampler(model, fast=True).sample(cond, noise, **kw)
    plain = DreamSampler(model, fast=False).sample(cond, noise, **kw)
    return fast, plain


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("cfg_scale,kind", [(3.0, "linear"), (2.0, "constant"), (1.0, "linear")])
def test_plain_sampling_fast_equals_plain(setup, B, cfg_scale, kind):
    cfg, model, cond, emb = setup
    cond, _ = _rows(cond, emb, B)
    fast, plain = _both(model, cond, _noise(cfg, B, 1), steps=6, cfg=cfg_scale, cfg_schedule_kind=kind,
                        temperature=0.9)
    assert fast.tokens_BLC.abs().sum() > 0
    torch.testing.assert_close(fast.tokens_BLC, plain.tokens_BLC, **TOL)


@pytest.mark.parametrize("B,K,greedy", [(1, 4, False), (3, 3, False), (2, 3, True)])
def test_sad_fast_equals_plain(setup, B, K, greedy):
    cfg, model, cond, emb = setup
    cond, emb = _rows(cond, emb, B)
    fast, plain = _both(model, cond, _noise(cfg, B, K), steps=6, cfg=3.0, threshold=3, greedy=greedy,
                        text_emb_BP=emb)
    # the candidates must differ for the selection to mean anything
    assert (plain.scores_BK.max(1).values - plain.scores_BK.min(1).values).min() > 1e-4
    torch.testing.assert_close(fast.scores_BK, plain.scores_BK, **TOL)
    assert torch.equal(fast.chosen_B, plain.chosen_B)
    for a, b in zip(fast.greedy_chosen, plain.greedy_chosen, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(fast.tokens_BLC, plain.tokens_BLC, **TOL)


def test_inpainting_fast_equals_plain(setup):
    cfg, model, cond, emb = setup
    cond, emb = _rows(cond, emb, 2)
    unknown = torch.arange(8, 40)
    known = torch.randn(1, model.seq_len, model.token_dim, generator=torch.Generator().manual_seed(2))
    fast, plain = _both(model, cond, _noise(cfg, 2, 2, unknown_idx=unknown), steps=5, cfg=3.0, threshold=2,
                        text_emb_BP=emb, known_tokens_BLC=known)
    torch.testing.assert_close(fast.tokens_BLC, plain.tokens_BLC, **TOL)


def test_text_keys_values_once_per_call(setup):
    """The fast path projects the text once per call (B prompt rows + 1 empty-caption row per
    block), the plain path at every step for every row."""
    cfg, model, cond, emb = setup
    cond, emb = _rows(cond, emb, 2)
    rows: list[int] = []
    hooks = [blk.cross.kv.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for blk in model.decoder_blocks]
    try:
        noise = _noise(cfg, 2, 3)
        DreamSampler(model, fast=True).sample(cond, noise, steps=6, cfg=3.0, threshold=3, text_emb_BP=emb)
        fast_rows, rows[:] = sorted(rows), []
        DreamSampler(model, fast=False).sample(cond, noise, steps=6, cfg=3.0, threshold=3, text_emb_BP=emb)
        plain_rows = list(rows)
    finally:
        for h in hooks:
            h.remove()
    depth = len(model.decoder_blocks)
    assert fast_rows == [1] * depth + [2] * depth
    assert len(plain_rows) == 6 * depth and sum(plain_rows) > 6 * depth * 4


def test_fast_steps_do_not_synchronise(setup):
    cfg, model, cond, emb = setup
    cond, emb = _rows(cond, emb, 2)
    s = DreamSampler(model, fast=True)
    for K, T, greedy in ((1, None, False), (3, 2, True)):
        plan = make_plan(2, K, model.seq_len, model.seq_len, 5, T, greedy, True)
        ctx = s._context(plan, cond, _noise(cfg, 2, K), 3.0, "linear", 1.0, emb, None)
        s._head_tables(torch.device("cpu"), torch.float32)
        with torch.no_grad(), NoHostSync():
            out = s.run_plan(plan, ctx)
        assert out["tokens"].shape == (2, model.seq_len, model.token_dim)


def test_batched_modulations_chunked_equal_unchunked(setup, monkeypatch):
    """The head's batched modulation GEMM split into chunks of timesteps gives the same samples."""
    cfg, model, cond, emb = setup
    cond, _ = _rows(cond, emb, 2)
    noise = _noise(cfg, 2, 1)
    whole = DreamSampler(model).sample(cond, noise, steps=4, cfg=3.0).tokens_BLC
    monkeypatch.setattr(DreamSampler, "MOD_CHUNK_ELEMS", 1)  # one timestep per GEMM
    chunked = DreamSampler(model).sample(cond, noise, steps=4, cfg=3.0).tokens_BLC
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
