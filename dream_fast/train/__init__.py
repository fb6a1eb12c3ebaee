"""Training engine for DREAM: DeepSpeed ZeRO 0-3 or plain PyTorch, shards and caches, exact resume.

`train(cfg)` runs in-process (one CPU process needs no launcher); `deepspeed --module
dream_fast.train --config X.yaml` runs the same code on many ranks. See docs/training.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dream_fast.train.export import export_checkpoint
    from dream_fast.train.trainer import TrainResult, train

__all__ = ["TrainResult", "export_checkpoint", "train"]


def __getattr__(name: str) -> Any:
    # Lazy: importing dream_fast.train must not import deepspeed (DS_ACCELERATOR is set first).
    if name in ("train", "TrainResult"):
        from dream_fast.train import trainer

        return getattr(trainer, name)
    if name == "export_checkpoint":
        from dream_fast.train.export import export_checkpoint

        return export_checkpoint
    raise AttributeError(f"module 'dream_fast.train' has no attribute {name!r}")
