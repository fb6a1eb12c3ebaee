"""Atomic, resumable checkpoints: engine state + EMA + RNG + data position + schedule progress.

Layout: RUN/checkpoints/step_00001000/{deepspeed/ | model.safetensors + optimizer.pt}, ema.safetensors
(full EMA state dict: EMA parameters + current buffers), portable.safetensors (fp32 weights and Adam
moments by parameter name: resume on another world size or engine), tokenizer.json, trainer_state.json,
rng_rank{r}.pt, data_rank{r}.json; RUN/checkpoints/latest names the newest complete one.
A checkpoint is written under .tmp-step_*, renamed when every rank is done, and `latest` is
replaced last, so a crash mid-save leaves the previous checkpoint intact. Everything we read back
is JSON, safetensors or torch.load(weights_only=True); DeepSpeed's own engine files are read by
DeepSpeed (pickle): resume only from run directories you wrote.

Fault injection for tests: DREAM_FAST_FAULT=sigkill_after_checkpoint:N kills the process (SIGKILL)
right after the checkpoint of step N is complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dream_fast.dist import DistInfo, barrier

log = logging.getLogger(__name__)

LATEST = "latest"
STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
PORTABLE = "portable.safetensors"  # world-size-independent engine state (elastic resume)


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state(np_rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": gen.get_state(),
        "numpy": np_rng.bit_generator.state,
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], np_rng: np.random.Generator, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    np_rng.bit_generator.state = state["numpy"]
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, engine: Any, ema_state: dict[str, torch.Tensor] | None,
                    trainer_state: dict[str, Any], rng: dict[str, Any], data_state: dict[str, Any],
                    info: DistInfo, keep: int, tokenizer_path: Path | None = None,
                    portable: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). Returns the final directory."""
    root = run_dir / "checkpoints"
    final = root / ckpt_name(step)
    tmp = root / f".tmp-{ckpt_name(step)}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp, info.is_main)
    torch.save(rng, tmp / f"rng_rank{info.rank}.pt")
    (tmp / f"data_rank{info.rank}.json").write_text(json.dumps(data_state))
    if info.is_main:
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
        if portable:
            save_file({k: v.contiguous() for k, v in portable.items()}, str(tmp / PORTABLE))
        if tokenizer_path is not None and tokenizer_path.is_file():
            shutil.copy2(tokenizer_path, tmp / "tokenizer.json")
        (tmp / STATE).write_text(json.dumps({**trainer_state, "world_size": info.world_size}, indent=1))
    barrier()
    if info.is_main:
        if final.exists():  # same step saved again (a resumed run that stopped at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep, final.name)
    barrier()
    fault = os.environ.get("DREAM_FAST_FAULT", "")
    if fault.startswith("sigkill_after_checkpoint:") and int(fault.split(":")[1]) == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int, newest: str) -> None:
    if keep < 1:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE).is_file())
    for old in done[:-keep]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    return ckpt if (ckpt / STATE).is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if (p / STATE).is_file():
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise FileNotFoundError(f"{p} is neither a checkpoint (no {STATE}) nor a run directory with "
                                "checkpoints/latest; give RUN_DIR or RUN_DIR/checkpoints/step_XXXXXXXX")
    return ckpt


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """None (fresh start), or the checkpoint to resume from for train.resume = auto | DIR."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    return resolve_checkpoint(resume)


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE).read_text())


def load_rank_files(ckpt: Path, rank: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(rng state, data position) saved by `rank`, or None where this rank did not exist then."""
    rng_path, data_path = ckpt / f"rng_rank{rank}.pt", ckpt / f"data_rank{rank}.json"
    rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    data = json.loads(data_path.read_text()) if data_path.is_file() else None
    return rng, data


def load_ema(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} has no {EMA_FILE}")
    return load_file(str(path))
