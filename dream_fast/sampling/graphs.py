"""CUDA-graph capture of sampling plans: each step of a plan is captured once per shape (one shared
memory pool, after an eager warm-up on a side stream) and replayed on later calls; outputs are cloned.

A step reads only the per-call context (static buffers the new call's tensors are copied into) and
the previous step's outputs (kept alive, so the pool never hands their memory to a later step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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


class PlanGraphs:
    """Captured plans keyed by (plan, context shapes/dtypes); one graph memory pool for all."""

    def __init__(self):
        self._plans: dict[tuple, _Captured] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._plans)

    def run(self, sampler, plan, ctx: dict[str, torch.Tensor]) -> dict:
        key = (plan, _signature(ctx), id(sampler.model))
        cap = self._plans.get(key)
        if cap is None:
            cap = self._capture(sampler, plan, ctx)
            self._plans[key] = cap
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
