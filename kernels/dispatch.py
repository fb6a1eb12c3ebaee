"""One place that decides which provider runs a fused op: Triton kernel or PyTorch reference.

Triton on CUDA tensors, the reference elsewhere; `DREAM_KERNELS=reference|triton` (environment)
or `set_provider()` (config) override. Under `TRITON_INTERPRET=1` "triton" also runs on CPU.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Provider = Literal["auto", "reference", "triton"]
_ALLOWED = ("auto", "reference", "triton")
_override: str = "auto"


def set_provider(name: str) -> None:
    """Config-level override; the environment variable DREAM_KERNELS still wins."""
    global _override
    if name not in _ALLOWED:
        raise ValueError(f"kernel provider {name!r} unknown; allowed: {list(_ALLOWED)}")
    _override = name


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_provider() -> str:
    env = os.environ.get("DREAM_KERNELS", "").strip().lower()
    if env:
        if env not in _ALLOWED:
            raise ValueError(f"DREAM_KERNELS={env!r} unknown; allowed: {list(_ALLOWED)}")
        return env
    return _override


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run for these inputs."""
    req = requested_provider()
    if req == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if req == "triton":
        if not (on_cuda or interpreter_active()):
            raise RuntimeError("DREAM_KERNELS=triton needs CUDA tensors or TRITON_INTERPRET=1 (CPU interpreter)")
        return True
    return on_cuda
