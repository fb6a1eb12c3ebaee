"""One place that decides which provider runs a fused op (Triton kernel or PyTorch reference),
and whether kernel backwards must be bitwise reproducible.

Provider: Triton on CUDA tensors, the reference elsewhere; `DREAM_KERNELS=reference|triton`
(environment) or `set_provider()` (config) override. Under `TRITON_INTERPRET=1` "triton" also
runs on CPU.

Deterministic mode (docs/design.md §1.2, §1.4): `set_deterministic(True)`, the environment
variable `DREAM_FAST_DETERMINISTIC=1`, or `torch.use_deterministic_algorithms(True)` make every
kernel backward atomic-free: per-program partial sums reduced in a fixed order, so two backward
runs on the same inputs are bitwise equal. Precedence: environment, then `set_deterministic`,
then torch's flag.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Provider = Literal["auto", "reference", "triton"]
_ALLOWED = ("auto", "reference", "triton")
_override: str = "auto"
_deterministic: bool | None = None  # None: follow torch.are_deterministic_algorithms_enabled()


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


def set_deterministic(enabled: bool | None) -> None:
    """Kernel backwards without atomics (bitwise reproducible) when True; None follows torch's
    `torch.use_deterministic_algorithms` flag. `DREAM_FAST_DETERMINISTIC` (environment) wins."""
    global _deterministic
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_deterministic takes True, False or None, got {enabled!r}")
    _deterministic = enabled


def deterministic() -> bool:
    """True when kernel backwards must avoid atomics (see the module docstring)."""
    env = os.environ.get("DREAM_FAST_DETERMINISTIC", "").strip().lower()
    if env:
        if env in ("1", "true", "on", "yes"):
            return True
        if env in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"DREAM_FAST_DETERMINISTIC={env!r} unknown; use 1/0 (or true/false, on/off)")
    if _deterministic is not None:
        return _deterministic
    return torch.are_deterministic_algorithms_enabled()


_SM_COUNT: dict[int, int] = {}
HOPPER_SMS = 132  # H100 / H200 SXM: the SM count assumed for `meta` tensors (compile checks)


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors behind `device` (cached: no device query per launch); 132 for
    `meta` tensors, so compile checks without a GPU see the GPU's launch choices; None on CPU
    (the interpreter), where launchers pick few, small programs."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        return _SM_COUNT[idx]
    if device.type == "meta":
        return HOPPER_SMS
    return None
