"""CUDA-graph plan cache (dream_fast/sampling/graphs.py): bounded, LRU, keyed by the live model.

Capturing needs CUDA; the cache logic does not: `_capture` is replaced by a stand-in whose "graphs"
count replays, so these run on CPU.
"""

from __future__ import annotations

import gc

import pytest
import torch

from dream_fast.sampling import graphs as G


class _Graph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _Model(torch.nn.Module):
    pass


class _Sampler:
    def __init__(self):
        self.model = _Model()


@pytest.fixture
def cache(monkeypatch):
    captured = []

    def fake_capture(self, sampler, plan, ctx):
        captured.append(plan)
        static = {k: v.clone() for k, v in ctx.items()}
        out = {"tokens": static["tokens0"] * 2, "selections": []}
        return G._Captured(static, [_Graph()], out, [], 0.01)

    monkeypatch.setattr(G.PlanGraphs, "_capture", fake_capture)
    return captured


def _ctx(n: int = 3) -> dict[str, torch.Tensor]:
    return {"tokens0": torch.ones(n), "noise_rows0": torch.zeros(n)}


def test_cache_is_lru_and_bounded(cache):
    pg, s = G.PlanGraphs(max_plans=2), _Sampler()
    for plan in ("a", "b", "a", "c"):  # "b" is least recently used when "c" arrives
        pg.run(s, plan, _ctx())
    assert len(pg) == 2 and cache == ["a", "b", "c"] and pg.evictions == 1
    pg.run(s, "a", _ctx())
    assert cache == ["a", "b", "c"]  # still cached
    pg.run(s, "b", _ctx())
    assert cache == ["a", "b", "c", "b"] and len(pg) == 2  # evicted earlier: captured again
    assert pg.captures == 4


def test_replay_copies_inputs_and_returns_fresh_outputs(cache):
    pg, s = G.PlanGraphs(max_plans=1), _Sampler()
    first = pg.run(s, "p", _ctx())
    ctx = _ctx()
    ctx["tokens0"].fill_(5.0)
    pg.run(s, "p", ctx)
    cap = next(iter(pg._plans.values()))
    assert cap.graphs[0].replays == 2 and torch.equal(cap.ctx["tokens0"], ctx["tokens0"])
    assert first["tokens"] is not cap.out["tokens"]
    pg.run(s, "p", _ctx(4))  # another shape is another plan
    assert cache == ["p", "p"]


def test_a_new_model_never_replays_an_old_models_graphs(cache, monkeypatch):
    pg, s = G.PlanGraphs(max_plans=4), _Sampler()
    pg.run(s, "p", _ctx())
    old_id = id(s.model)
    s.model = _Model()
    gc.collect()
    # force the id collision a freed model can cause
    monkeypatch.setattr(G, "id", lambda obj: old_id if isinstance(obj, _Model) else object.__hash__(obj),
                        raising=False)
    pg.run(s, "p", _ctx())
    assert cache == ["p", "p"]


def test_size_is_configurable(monkeypatch):
    monkeypatch.setenv("DREAM_CUDA_GRAPH_PLANS", "3")
    assert G.PlanGraphs().max_plans == 3
    monkeypatch.delenv("DREAM_CUDA_GRAPH_PLANS")
    assert G.PlanGraphs().max_plans == G.DEFAULT_MAX_PLANS
    with pytest.raises(ValueError, match="positive integer"):
        G.PlanGraphs(max_plans=0)
    monkeypatch.setenv("DREAM_CUDA_GRAPH_PLANS", "many")
    with pytest.raises(ValueError, match="DREAM_CUDA_GRAPH_PLANS"):
        G.PlanGraphs()
