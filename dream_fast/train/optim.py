"""AdamW with the recipe's parameter groups and the per-step learning-rate schedule (docs/design.md §1.8).

lr = blr * global_batch / 256 (unless optim.lr is set), linear warmup over `warmup_epochs`, then
constant or cosine down to min_lr at the end of the run, all measured in samples seen. We set the lr
ourselves every optimizer step, so DeepSpeed never owns a scheduler and resume only needs the samples
seen (which also survive a change of world size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dream_fast.config import OptimConfig


@dataclass
class Schedule:
    """Learning rate as a function of the samples seen (all ranks), so a run resumed on another number
    of GPUs keeps its schedule: warmup over `warmup_samples`, then constant or cosine to min_lr at
    `total_samples`. With a fixed global batch B, lr(step * B, B) is the per-step schedule."""

    base_lr: float
    warmup_samples: float
    total_samples: float
    kind: str = "constant"
    min_lr: float = 0.0

    def lr(self, samples_seen: float, global_batch: int) -> float:
        """The lr of the optimizer step that starts after `samples_seen` and consumes `global_batch`."""
        done = samples_seen + global_batch
        if self.warmup_samples > 0 and done <= self.warmup_samples:
            return self.base_lr * done / self.warmup_samples
        if self.kind == "cosine":
            span = max(self.total_samples - self.warmup_samples, float(global_batch))
            frac = min(max((samples_seen - self.warmup_samples) / span, 0.0), 1.0)
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.base_lr


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    """optim.lr when set, else the linear scaling rule blr * global_batch / 256."""
    return float(cfg.lr) if cfg.lr is not None else cfg.blr * global_batch / 256.0


def make_schedule(cfg: OptimConfig, global_batch: int, epoch_size: int, total_samples: float) -> Schedule:
    return Schedule(base_lr(cfg, global_batch), cfg.warmup_epochs * epoch_size, total_samples,
                    cfg.lr_schedule, cfg.min_lr)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fast: bool = True) -> torch.optim.AdamW:
    """torch AdamW over model.param_groups (no decay on biases, 1-D params, the diffusion head).

    The same client optimizer goes to DeepSpeed (ZeRO wraps it), so the single-process and the
    sharded runs apply the identical update rule. fast=False: torch's plain per-parameter loop
    (the benchmarks' eager reference), else `adamw_impl`.
    """
    groups = model.param_groups(cfg.weight_decay) if hasattr(model, "param_groups") else [
        {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=1e-8, weight_decay=cfg.weight_decay,
                             **(adamw_impl([p for g in groups for p in g["params"]]) if fast
                                else {"foreach": False, "fused": False}))


def adamw_impl(params: list[torch.Tensor]) -> dict[str, bool]:
    """The fastest AdamW implementation torch offers for these parameters (docs/performance.md):
    `fused` (one kernel over all tensors) when every parameter is a floating-point tensor on CPU or
    CUDA, else `foreach` (one multi-tensor op per update term); the plain per-parameter loop
    only when neither applies. Same update rule, fp32 rounding differences only."""
    devices = {p.device.type for p in params}
    floating = all(p.is_floating_point() for p in params)
    if params and floating and devices <= {"cpu", "cuda"} and len(devices) == 1:
        return {"fused": True}
    if params and floating:
        return {"foreach": True}
    return {}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
