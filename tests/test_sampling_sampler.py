"""Sampler: equals a naive per-candidate MAR loop (plain, SAD, greedy SAD, inpainting), K = 1 is
bit-identical to plain sampling, the batched K pass equals K separate runs, steps never sync."""

import pytest
import torch
import torch.nn.functional as F
from sampling_helpers import HostSyncError, NoHostSync, naive_sample, prompt_ids, tiny_model

from dream_fast.sampling.sampler import DreamSampler, draw_noise, make_plan

TOL = dict(atol=2e-4, rtol=2e-4)


@pytest.fixture(scope="module")
def setup():
    cfg, model = tiny_model()
    ids = prompt_ids(cfg, 2)
    with torch.no_grad():
        emb, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
    return cfg, model, cond, emb


def _noise(cfg, K, seeds=(3, 11), unknown_idx=None):
    m = cfg.model
    return draw_noise(list(seeds), K, m.seq_len, m.token_dim, m.num_sampling_steps, unknown_idx=unknown_idx)


def _row(cond, b):
    return type(cond)(cond.tokens[b : b + 1], cond.mask[b : b + 1])


def test_plan_shapes():
    B, K, L, N, T = 2, 3, 64, 6, 2
    plan = make_plan(B, K, L, L, N, T, False, True)
    assert plan.masked[0] == L and plan.masked[-1] == 0
    got = [(s.k, s.rows, s.select, s.fillings) for s in plan.specs]
    # step 0: one decoder pass per prompt, K fillings; then K candidates until T; best one after
    assert got == [
        (0, 2, False, 3),
        (1, 6, False, 1),
        (2, 6, True, 1),
        (3, 2, False, 1),
        (4, 2, False, 1),
        (5, 2, False, 1),
    ]
    assert not plan.final_select
    greedy = make_plan(B, K, L, L, N, T, True, True)
    assert [(s.rows, s.select, s.fillings) for s in greedy.specs[2:]] == [(6, True, 3)] * 4
    assert greedy.final_select
    plain = make_plan(B, 1, L, L, N, None, False, True)
    assert [(s.rows, s.select, s.fillings) for s in plain.specs] == [(2, False, 1)] * N


@pytest.mark.parametrize("cfg_scale,kind", [(3.0, "linear"), (1.0, "linear"), (2.0, "constant")])
def test_plain_sampling_equals_naive_loop(setup, cfg_scale, kind):
    cfg, model, cond, _ = setup
    noise = _noise(cfg, 1)
    res = DreamSampler(model).sample(cond, noise, steps=6, cfg=cfg_scale, cfg_schedule_kind=kind, temperature=0.9)
    assert res.scores_BK is None and res.chosen_B is None
    for b in range(2):
        want, *_ = naive_sample(
            model,
            _row(cond, b),
            noise.order_BL[b],
            noise.noise_BKLJC[b],
            6,
            cfg_scale,
            temperature=0.9,
            cfg_kind=kind,
        )
        torch.testing.assert_close(res.tokens_BLC[b], want[0], **TOL)


@pytest.mark.parametrize("greedy", [False, True])
def test_sad_equals_naive_per_candidate_loop(setup, greedy):
    cfg, model, cond, emb = setup
    K, N, T = 3, 6, 2
    noise = _noise(cfg, K)
    res = DreamSampler(model).sample(cond, noise, steps=N, cfg=3.0, threshold=T, greedy=greedy, text_emb_BP=emb)
    assert res.scores_BK.shape == (2, K)
    assert len(res.greedy_scores) == (N - T if greedy else 0)
    for b in range(2):
        tok, scores, chosen, g_chosen = naive_sample(
            model,
            _row(cond, b),
            noise.order_BL[b],
            noise.noise_BKLJC[b],
            N,
            3.0,
            threshold=T,
            greedy=greedy,
            text_emb_P=emb[b],
        )
        torch.testing.assert_close(res.scores_BK[b], torch.tensor(scores), **TOL)
        assert int(res.chosen_B[b]) == chosen
        assert [int(c[b]) for c in res.greedy_chosen] == g_chosen
        torch.testing.assert_close(res.tokens_BLC[b], tok[0], **TOL)
    # the candidates really differ, so selection is not vacuous
    assert (res.scores_BK.max(1).values - res.scores_BK.min(1).values).min() > 1e-4


def test_k1_sad_bit_identical_to_plain(setup):
    cfg, model, cond, emb = setup
    s = DreamSampler(model)
    plain = s.sample(cond, _noise(cfg, 1), steps=6, cfg=3.0)
    for greedy in (False, True):
        sad = s.sample(cond, _noise(cfg, 1), steps=6, cfg=3.0, threshold=3, greedy=greedy, text_emb_BP=emb)
        assert torch.equal(sad.tokens_BLC, plain.tokens_BLC)
        assert sad.chosen_B.tolist() == [0, 0]


def test_batched_candidates_equal_separate_runs(setup):
    """SAD's one batched pass over K candidates = K plain runs, each with that candidate's noise."""
    cfg, model, cond, emb = setup
    K, N, T = 4, 6, 3
    s = DreamSampler(model)
    noise = _noise(cfg, K)
    res = s.sample(cond, noise, steps=N, cfg=3.0, threshold=T, text_emb_BP=emb)
    # each candidate alone: plain steps 0..T-1, then its score, then the rest of its own run
    plan = make_plan(2, 1, model.seq_len, model.seq_len, N, None, False, True)
    txt = F.normalize(emb, dim=-1)
    finals, scores = [], []
    for j in range(K):
        nj = noise.candidate(j)
        ctx = s._context(plan, cond, nj, 3.0, "linear", 1.0, None, None)
        tok, rows = ctx["tokens0"], ctx["noise_rows0"]
        with torch.no_grad():
            for spec in plan.specs:
                if spec.k == T:
                    enc = model.encode(tok, nj.order_BL[:, spec.m_now :])
                    scores.append((F.normalize(model.image_embedding(enc), dim=-1) * txt).sum(-1))
                tok, rows, _ = s.step(plan, spec, ctx, tok, rows)
        finals.append(tok)
        torch.testing.assert_close(tok, s.sample(cond, nj, steps=N, cfg=3.0).tokens_BLC, atol=0, rtol=0)
    scores_BK = torch.stack(scores, 1)
    torch.testing.assert_close(res.scores_BK, scores_BK, **TOL)
    assert torch.equal(res.chosen_B, scores_BK.argmax(1))
    for b in range(2):
        torch.testing.assert_close(res.tokens_BLC[b], finals[int(res.chosen_B[b])][b], **TOL)


def test_inpainting_keeps_known_tokens_and_matches_naive(setup):
    cfg, model, cond, emb = setup
    L, C = model.seq_len, model.token_dim
    unknown = torch.arange(16, 48)  # the middle rows of the 8x8 grid
    known = torch.randn(1, L, C, generator=torch.Generator().manual_seed(1))
    noise = _noise(cfg, 2, unknown_idx=unknown)
    assert noise.num_unknown == 32 and set(noise.order_BL[0, :32].tolist()) == set(unknown.tolist())
    res = DreamSampler(model).sample(
        cond, noise, steps=5, cfg=3.0, threshold=2, text_emb_BP=emb, known_tokens_BLC=known
    )
    keep = torch.ones(L, dtype=torch.bool)
    keep[unknown] = False
    assert torch.equal(res.tokens_BLC[:, keep], known[:, keep].expand(2, -1, -1))
    assert not torch.allclose(res.tokens_BLC[:, ~keep], known[:, ~keep].expand(2, -1, -1))
    for b in range(2):
        tok, scores, chosen, _ = naive_sample(
            model,
            _row(cond, b),
            noise.order_BL[b],
            noise.noise_BKLJC[b],
            5,
            3.0,
            threshold=2,
            text_emb_P=emb[b],
            known_1LC=known,
            num_unknown=32,
        )
        torch.testing.assert_close(res.tokens_BLC[b], tok[0], **TOL)
        assert int(res.chosen_B[b]) == chosen


def test_fewer_tokens_than_steps_skips_empty_steps(setup):
    cfg, model, cond, emb = setup
    unknown = torch.tensor([0, 9, 63])
    known = torch.zeros(1, model.seq_len, model.token_dim)
    noise = _noise(cfg, 2, unknown_idx=unknown)
    plan = make_plan(2, 2, model.seq_len, 3, 8, 4, False, True)
    assert sum(s.m_now - s.m_next for s in plan.specs) == 3 and sum(s.select for s in plan.specs) == 1
    res = DreamSampler(model).sample(
        cond, noise, steps=8, cfg=2.0, threshold=4, text_emb_BP=emb, known_tokens_BLC=known
    )
    assert res.tokens_BLC[:, unknown].abs().sum() > 0 and res.chosen_B is not None


def test_steps_do_not_synchronise(setup):
    cfg, model, cond, emb = setup
    s = DreamSampler(model)
    for K, T, greedy in ((1, None, False), (3, 2, False), (2, 2, True)):
        noise = _noise(cfg, K)
        plan = make_plan(2, K, model.seq_len, model.seq_len, 5, T, greedy, True)
        ctx = s._context(plan, cond, noise, 3.0, "linear", 1.0, emb, None)
        s._head_tables(torch.device("cpu"), torch.float32)  # per-model setup, not part of a step
        with torch.no_grad(), NoHostSync():
            out = s.run_plan(plan, ctx)
        assert out["tokens"].shape == (2, model.seq_len, model.token_dim)


def test_sync_audit_catches_syncs():
    x = torch.randn(4)
    with pytest.raises(HostSyncError), NoHostSync():
        x.sum().item()
    with pytest.raises(HostSyncError), NoHostSync():
        x[x > 0]
    with pytest.raises(HostSyncError), NoHostSync():
        if x.max() > 0:
            pass


def test_bad_arguments(setup):
    cfg, model, cond, emb = setup
    s = DreamSampler(model)
    noise = _noise(cfg, 2)
    with pytest.raises(ValueError, match="threshold must be in"):
        s.sample(cond, noise, steps=4, cfg=2.0, threshold=4, text_emb_BP=emb)
    with pytest.raises(ValueError, match="needs a SAD threshold"):
        s.sample(cond, noise, steps=4, cfg=2.0)
    with pytest.raises(ValueError, match="cfg must be >= 1.0"):
        s.sample(cond, noise, steps=4, cfg=0.5, threshold=2, text_emb_BP=emb)
    with pytest.raises(ValueError, match="needs text_emb_BP"):
        s.sample(cond, noise, steps=4, threshold=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        s.sample(cond, _noise(cfg, 1), steps=0)
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            s.sample(cond, _noise(cfg, 1), steps=2)
    finally:
        model.eval()


@pytest.mark.gpu
def test_cuda_steps_no_sync_and_graphs_match_eager():
    cfg, model = tiny_model()
    model = model.cuda()
    ids = prompt_ids(cfg, 2).cuda()
    with torch.no_grad():
        emb, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
    m = cfg.model
    eager, graphed = DreamSampler(model, use_cuda_graphs=False), DreamSampler(model, use_cuda_graphs=True)
    for seeds in ((3, 11), (5, 6)):
        noise = draw_noise(list(seeds), 3, m.seq_len, m.token_dim, m.num_sampling_steps, device="cuda")
        plan = make_plan(2, 3, m.seq_len, m.seq_len, 6, 3, True, True)
        with torch.no_grad():
            ctx = eager._context(plan, cond, noise, 3.0, "linear", 1.0, emb, None)
            eager.run_plan(plan, ctx)  # warm-up (lazy inits may sync once)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                eager.run_plan(plan, ctx)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        a = eager.sample(cond, noise, steps=6, cfg=3.0, threshold=3, greedy=True, text_emb_BP=emb)
        b = graphed.sample(cond, noise, steps=6, cfg=3.0, threshold=3, greedy=True, text_emb_BP=emb)
        torch.testing.assert_close(a.tokens_BLC, b.tokens_BLC, atol=1e-4, rtol=1e-4)
        assert torch.equal(a.chosen_B, b.chosen_B)
    assert len(graphed._graphs) == 1  # the second call replayed the first call's graphs
