"""Worker for tests/test_train_ema.py: under DeepSpeed bf16 (ZeRO 1/2/3, 2 ranks) the EMA averages the
fp32 master weights, each rank holding only its share, and rank 0 alone assembles full tensors.

Per stage, after every step the worker also keeps two full-size references on rank 0: the EMA of the
gathered fp32 masters and the EMA of the bf16 weights the forward reads. It saves both and the EMA's own
full tensors, and each rank's share of elements.

Usage: RANK=r WORLD_SIZE=w MASTER_PORT=p python tests/_ema_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_parity_worker import GLOBAL_B, deterministic_diffloss, global_batch, mini_cfg  # noqa: E402

from dream_fast.model import build_model  # noqa: E402
from dream_fast.model.diffloss import DiffLoss  # noqa: E402

STEPS, DECAY = 3, 0.5


def one_step(eng, cfg, step: int, rows: slice) -> None:
    tokens, ids, order = global_batch(cfg, step)
    eng.set_lr(cfg.optim.lr)
    out = eng.forward(tokens[rows].to(eng.input_dtype()), ids[rows], (3 * cfg.model.seq_len) // 4, order[rows])
    eng.backward(out["loss"])
    eng.step()


def gathered(eng, stage: int) -> tuple[dict, dict]:
    """Full fp32 masters and full bf16 weights (as fp32) of every parameter (collectives)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    masters, weights = {}, {}
    for n, p in eng.module.named_parameters():
        masters[n] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
        with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
            weights[n] = p.detach().float().cpu().clone()
    return masters, weights


def main() -> None:
    out_dir = Path(sys.argv[1])
    DiffLoss.forward = deterministic_diffloss
    from dream_fast.dist import init_distributed, teardown
    from dream_fast.train.ema import EMA
    from dream_fast.train.engine import build_engine

    torch.set_num_threads(1)
    info = init_distributed(use_deepspeed=True)
    per = GLOBAL_B // info.world_size
    rows = slice(info.rank * per, (info.rank + 1) * per)
    shares = {}
    try:
        for stage in (1, 2, 3):
            cfg = mini_cfg(stage, "deepspeed", out_dir)
            cfg.train.precision = "bf16"
            torch.manual_seed(0)
            eng = build_engine(build_model(cfg.model, cfg.loss), cfg, info)
            ema = EMA(*eng.ema_shards(), decay=DECAY)
            ref32, ref16 = gathered(eng, stage)  # the EMA starts from the initial weights
            for step in range(STEPS):
                one_step(eng, cfg, step, rows)
                ema.update()
                masters, weights = gathered(eng, stage)
                for n in ref32:
                    ref32[n] = torch.lerp(ref32[n], masters[n], 1 - DECAY)
                    ref16[n] = torch.lerp(ref16[n], weights[n], 1 - DECAY)
            full = ema.full()  # collective; {} except on rank 0
            shares[stage] = ema.numel()
            if info.is_main:
                save_file({**{f"ema.{k}": v.contiguous() for k, v in full.items()},
                           **{f"ref32.{k}": v.contiguous() for k, v in ref32.items()},
                           **{f"ref16.{k}": v.contiguous() for k, v in ref16.items()}},
                          str(out_dir / f"ema_z{stage}.safetensors"))
            else:
                assert full == {}, "only rank 0 assembles the full EMA"
    finally:
        teardown(info)
    (out_dir / f"shares_rank{info.rank}.json").write_text(json.dumps(shares))


if __name__ == "__main__":
    main()
