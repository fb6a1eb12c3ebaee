"""Inductor sample.compile=block vs the eager fast sampler, bench_ref_tiny b1 K=1, 1 thread
(the run of 2026-12-03 09:29). From the repository root:
`PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/results/2026-12-03_perf_epyc-2c-avx512bf16/inductor_head_step.py`.
Output of that run: inductor_head_step.txt.
"""

import os
import time

import torch

from benchmarks.benchmark_sampler import _interleaved, build, sampler_call
from dream_fast.compile import compile_counts

torch.set_num_threads(1)
cfg, model = build("bench_ref_tiny")
eager = sampler_call(cfg, model, 1, 1, None, False, fast=True)
comp = sampler_call(cfg, model, 1, 1, None, False, fast=True, compile="block")
for name in ("first", "second"):
    t0 = time.perf_counter()
    comp()
    print(f"{name} compiled call", time.perf_counter() - t0, "s", compile_counts(), flush=True)
te, tc = _interleaved(eager, comp, 4)
print(f"eager fast p50 {te['p50']:.0f} ms, compile=block p50 {tc['p50']:.0f} ms, ratio {te['p50'] / tc['p50']:.2f}x",
      compile_counts(), flush=True)
print("load", os.getloadavg())
