"""Shared minimal training configs for the tests/test_train_*.py files (depth 1, width 32, 16 px)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def mini_config(tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A YAML-ready dict: the tiny preset shrunk to test size, shapes data under tmp, overrides merged."""
    cfg: dict[str, Any] = {
        "preset": "tiny",
        "model": dict(img_size=16, patch_size=4, buffer_size=4, enc_width=32, dec_width=32, enc_depth=1,
                      dec_depth=1, enc_heads=2, dec_heads=2, proj_hidden=32, proj_dim=16, text_width=32,
                      text_depth=1, text_heads=2, text_context=8, vocab_size=300, aligner_depth=1,
                      diffloss_d=1, diffloss_w=32, diffusion_batch_mul=2),
        "data": dict(shapes_dir=str(tmp / "shapes"), shapes_num_train=128, shapes_num_val=8),
        "train": dict(batch_size=8, max_steps=4, log_every=1, ckpt_every=2, out_dir=str(tmp / "run"),
                      precision="fp32", threads=1),
    }  # fmt: skip
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dream_fast.train", "--no-progress", *args]


def run_ranks(worker: str, world: int, *args: str, timeout: float = 900) -> None:
    """Run tests/<worker> as `world` gloo ranks on one free port (RANK/WORLD_SIZE/MASTER_* set, one thread
    each, deterministic kernel backwards) with the given arguments; fail with each failed rank's last output."""
    import subprocess

    from dream_fast.dist import free_port

    port = free_port()
    procs = []
    for r in range(world):
        env = subprocess_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port), DREAM_FAST_DETERMINISTIC="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / worker), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    failed = [f"--- rank {r} of {world} (exit {p.returncode}):\n{text[-3000:]}"
              for r, (p, text) in enumerate(zip(procs, logs)) if p.returncode != 0]
    assert not failed, f"{worker} {' '.join(args)}:\n" + "\n".join(failed)
