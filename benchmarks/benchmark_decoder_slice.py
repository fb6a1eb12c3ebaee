"""Cost of the multi-rank weight-0 decoder slice: a micro-batch below the diffusion threshold, forward +
backward, with the decoder skipped (one process: `0 * sum(p)`) against the decoder and head run on one
sample at weight 0 (what every rank does under DeepSpeed so all ranks build the same graph), and
against the full weight-0 decoder (the earlier ZeRO-3 path). Interleaved repetitions, medians.

    python -m benchmarks.benchmark_decoder_slice [--preset tiny] [--batch 64] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dream_fast.config import get_preset
from dream_fast.model.dream import build_model
from dream_fast.model.masking import num_masked, random_orders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.3, help="mask ratio below the diffusion threshold")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m, cfg.loss).train()
    B, L = args.batch, m.seq_len
    tokens = torch.randn(B, L, m.token_dim)
    ids = torch.randint(3, m.vocab_size, (B, m.text_context))
    n = num_masked(args.ratio, L)
    assert not cfg.loss.diff_eligible(n, L), "--ratio must be below loss.diff_threshold"
    order = random_orders(B, L, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))

    def step(variant: str) -> float:
        model.same_graph_every_rank = variant != "skip"
        saved = cfg.loss.diff_threshold, cfg.loss.diff_weight
        if variant == "full weight 0":
            model.loss_cfg.diff_threshold, model.loss_cfg.diff_weight = 0.0, 0.0
        try:
            t0 = time.perf_counter()
            model(tokens, ids, n, order)["loss"].backward()
            dt = time.perf_counter() - t0
        finally:
            model.loss_cfg.diff_threshold, model.loss_cfg.diff_weight = saved
        model.zero_grad(set_to_none=True)
        return dt

    variants = ["skip", "one-sample slice", "full weight 0"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        step(v)  # warm-up
    for _ in range(args.reps):
        for v in variants:
            times[v].append(step(v))
    base = statistics.median(times["skip"])
    load = os.getloadavg()[0]
    print(f"preset {args.preset}, batch {B}, mask ratio {args.ratio}, threads {torch.get_num_threads()}, "
          f"load {load:.1f}")
    print("| below-threshold micro-batch | fwd+bwd (median) | / skip |\n|---|---|---|")
    for v in variants:
        t = statistics.median(times[v])
        print(f"| {v} | {t * 1e3:.1f} ms | {t / base:.3f}x |")


if __name__ == "__main__":
    main()
