"""CUDA-graph capture of sampling plans: each step of a plan is captured once per shape (one shared
memory pool, after an eager warm-up on a side stream) and replayed on later calls; outputs are cloned.

A step reads only the per-call context (static buffers the new call's tensors are copied into) and
the previous step's outputs (kept alive, so the pool never hands their memory to a later step).

The cache is bounded (docs/design.md §4 principle 4; docs/gpu.md): at most `max_plans` captured plans
(default 8, or the environment's DREAM_CUDA_GRAPH_PLANS), least recently used evicted first; each
capture's time is logged. A plan is keyed by its shapes and the model object (held weakly: a new
model never replays an old one's graphs).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def _signature(ctx: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in sorted(ctx.items()))


@dataclass
class _Captured:
    ctx: dict[str, torch.Tensor]  # static inputs
    graphs: list[torch.cuda.CUDAGraph]
    out: dict  # static outputs of the last graph (tokens, selections)
    keepalive: list  # every intermediate step output read by a later graph
    capture_s: float
    model: weakref.ref | None = field(default=None, compare=False)  # the model the graphs read


DEFAULT_MAX_PLANS = 8


def _max_plans_default() -> int:
    raw = os.environ.get("DREAM_CUDA_GRAPH_PLANS", "").strip()
    if not raw:
        return DEFAULT_MAX_PLANS
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"DREAM_CUDA_GRAPH_PLANS={raw!r}: expected a positive integer (captured plans kept)") from None


class PlanGraphs:
    """Captured plans keyed by (plan, context shapes/dtypes, model); one graph memory pool for all.

    max_plans: how many captured plans are kept (LRU); None reads DREAM_CUDA_GRAPH_PLANS (default 8).
    Each plan holds its step graphs and static buffers, so a long-lived sampler that sees many
    batch sizes / candidate counts would otherwise keep every one of them alive.
    """

    def __init__(self, max_plans: int | None = None):
        max_plans = _max_plans_default() if max_plans is None else max_plans
        if not isinstance(max_plans, int) or max_plans < 1:
            raise ValueError(f"max_plans must be a positive integer (captured plans kept), got {max_plans!r}")
        self.max_plans = max_plans
        self._plans: OrderedDict[tuple, _Captured] = OrderedDict()
        self._pool = None
        self.captures = 0  # plans captured so far (evicted ones included)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._plans)

    def run(self, sampler, plan, ctx: dict[str, torch.Tensor]) -> dict:
        key = (plan, _signature(ctx), id(sampler.model))
        cap = self._plans.get(key)
        if cap is not None and (cap.model is None or cap.model() is not sampler.model):
            del self._plans[key]  # id() reused by another model: its graphs read freed weights
            cap = None
        if cap is None:
            cap = self._capture(sampler, plan, ctx)
            cap.model = weakref.ref(sampler.model)
            self.captures += 1
            self._plans[key] = cap
            while len(self._plans) > self.max_plans:
                _, old = self._plans.popitem(last=False)
                self.evictions += 1
                log.info("CUDA-graph plan cache full (%d plans): evicted a %d-graph plan captured in %.2fs",
                         self.max_plans, len(old.graphs), old.capture_s)
        else:
            self._plans.move_to_end(key)
        for name, t in ctx.items():
            cap.ctx[name].copy_(t)
        for g in cap.graphs:
            g.replay()
        # the static outputs are overwritten by the next replay: hand out copies
        return {
            "tokens": cap.out["tokens"].clone(),
            "selections": [{k: v.clone() for k, v in s.items()} for s in cap.out["selections"]],
        }

    def _capture(self, sampler, plan, ctx: dict[str, torch.Tensor]) -> _Captured:
        t0 = time.perf_counter()
        static = {k: v.clone() for k, v in ctx.items()}
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Warm-up on a side stream: cuBLAS workspaces, Triton JIT and autotuning happen here, not
        # inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sampler.run_plan(plan, static)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        graphs: list[torch.cuda.CUDAGraph] = []
        keepalive: list = []
        selections: list[dict[str, torch.Tensor]] = []
        tokens, noise_rows = static["tokens0"], static["noise_rows0"]
        for spec in plan.specs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                tokens, noise_rows, sel = sampler.step(plan, spec, static, tokens, noise_rows)
            graphs.append(g)
            keepalive.append((tokens, noise_rows))
            if sel:
                selections.append(sel)
        if plan.final_select:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                tokens, sel = sampler.final_select(plan, static, tokens)
            graphs.append(g)
            selections.append(sel)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        log.info(
            "captured %d CUDA graphs for a %d-step plan (batch %d, K %d) in %.2fs",
            len(graphs),
            plan.steps,
            plan.batch,
            plan.candidates,
            dt,
        )
        return _Captured(static, graphs, {"tokens": tokens, "selections": selections}, keepalive, dt)
