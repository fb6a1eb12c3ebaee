"""Worker for tests/test_train_elastic.py: the portable engine state moves between engines and world sizes.

World 1: a plain-PyTorch engine trains 2 steps and writes its portable state; fresh DeepSpeed ZeRO-1/2/3
engines (other initial weights) load it, give it back unchanged, and take the next AdamW step to the
same weights as the PyTorch engine (the step count and both moments were restored).
World 2: each ZeRO stage loads the world-1 state and gives it back unchanged (gathered from 2 shards).

Usage: RANK=r WORLD_SIZE=w MASTER_PORT=p python tests/_elastic_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_parity_worker import deterministic_diffloss, global_batch, mini_cfg  # noqa: E402

from dream_fast.model import build_model  # noqa: E402
from dream_fast.model.diffloss import DiffLoss  # noqa: E402

ADAM_STEPS = 2


def one_step(eng, cfg, step: int, rows: slice) -> None:
    tokens, ids, order = global_batch(cfg, step)
    eng.set_lr(cfg.optim.lr)
    out = eng.forward(tokens[rows], ids[rows], (3 * cfg.model.seq_len) // 4, order[rows])
    eng.backward(out["loss"])
    eng.step()


def main() -> None:
    out_dir = Path(sys.argv[1])
    DiffLoss.forward = deterministic_diffloss
    from dream_fast.dist import init_distributed, teardown
    from dream_fast.train.engine import build_engine

    torch.set_num_threads(1)
    info = init_distributed(use_deepspeed=True)
    portable_path = out_dir / "portable_w1.safetensors"
    try:
        if info.world_size == 1:
            cfg = mini_cfg(0, "torch", out_dir)
            torch.manual_seed(0)
            eng = build_engine(build_model(cfg.model, cfg.loss), cfg, info)
            for step in range(ADAM_STEPS):
                one_step(eng, cfg, step, slice(None))
            save_file(eng.portable_state(), str(portable_path))
            one_step(eng, cfg, ADAM_STEPS, slice(None))
            save_file(eng.portable_state(), str(out_dir / "torch_next.safetensors"))
        state = load_file(str(portable_path))
        for stage in (1, 2, 3):
            cfg = mini_cfg(stage, "deepspeed", out_dir)
            torch.manual_seed(1)  # other initial weights: everything must come from the portable state
            eng = build_engine(build_model(cfg.model, cfg.loss), cfg, info)
            eng.load_portable(state, adam_steps=ADAM_STEPS)
            back = eng.portable_state()
            if info.world_size == 1:
                one_step(eng, cfg, ADAM_STEPS, slice(None))
                nxt = eng.portable_state()
            if info.is_main:
                save_file(back, str(out_dir / f"back_w{info.world_size}_z{stage}.safetensors"))
                if info.world_size == 1:
                    save_file(nxt, str(out_dir / f"next_w1_z{stage}.safetensors"))
    finally:
        teardown(info)


if __name__ == "__main__":
    from dream_fast.dist import exit_process

    main()
    exit_process(0)
