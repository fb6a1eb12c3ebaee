"""`torch.compile` as an option for training (`train.compile`) and sampling (`sample.compile`).

Modes (docs/performance.md):
  off    plain eager PyTorch (the default; the tests' reference).
  block  each transformer block (encoder, decoder, text tower, aligner) and the diffusion head's
         forward compiled on their own: small graphs, quick to compile, no graph over the host-side
         branches of the loss.
  step   training: the model's whole forward (both losses) as one graph, its backward through
         AOTAutograd; sampling: the encoder, the decoder and the head's whole denoising loop of one
         generation step, one graph each.

Shapes are marked dynamic (`dynamic=True`): the kept-token count L - m changes with every mask ratio
of Masking Warmup and the rows and predicted tokens change between sampling steps, and a static
compile would recompile at each new value. Every graph Inductor compiles is counted
(`compile_counts()`), so benchmarks and tests report recompiles instead of guessing them.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

MODES = ("off", "block", "step")
_counts: collections.Counter[str] = collections.Counter()


def check_mode(mode: str, key: str = "compile") -> str:
    """The mode, or a ValueError naming the key and the allowed values."""
    if mode not in MODES:
        raise ValueError(
            f"{key}={mode!r} unknown; allowed: 'off' (eager), 'block' (each transformer block and the "
            f"diffusion head compiled alone) or 'step' (the whole training step / sampling step)"
        )
    return mode


def compile_counts() -> dict[str, int]:
    """Graphs compiled so far, by label (a label compiled more than once recompiled)."""
    return dict(_counts)


def reset_counts() -> None:
    _counts.clear()


BACKENDS = ("inductor", "aot_eager", "eager")


def backend_name() -> str:
    """DREAM_COMPILE_BACKEND (environment): inductor (default: fused C++/OpenMP kernels on CPU,
    Triton on GPU), or aot_eager / eager (the same graphs, dynamic shapes and recompiles without
    code generation: what the cheap tests use, a C++ compile per graph is slow on a shared CPU)."""
    name = os.environ.get("DREAM_COMPILE_BACKEND", "inductor").strip().lower() or "inductor"
    if name not in BACKENDS:
        raise ValueError(f"DREAM_COMPILE_BACKEND={name!r} unknown; allowed: {list(BACKENDS)}")
    return name


def _counting_backend(label: str) -> Callable:
    """The chosen backend (backend_name()), counting each graph it is handed under `label`."""
    name = backend_name()

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        _counts[label] += 1
        log.info("torch.compile: graph %d of %s (%d nodes, %s)", _counts[label], label, len(gm.graph.nodes), name)
        if name == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(name)(gm, example_inputs)

    return backend


def compiled(fn: Callable, label: str) -> Callable:
    """torch.compile(fn) with dynamic shapes and the counting Inductor backend."""
    return torch.compile(fn, backend=_counting_backend(label), dynamic=True)


def compile_modules(modules: list[nn.Module], label: str) -> None:
    """Compile each module's forward in place (nn.Module.compile: parameters, state dicts and
    hooks stay the module's own)."""
    backend = _counting_backend(label)
    for m in modules:
        m.compile(backend=backend, dynamic=True)


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The per-block units `block` mode compiles in a DREAM model."""
    blocks: list[nn.Module] = [*model.encoder_blocks, *model.decoder_blocks]
    for name in ("text_tower", "text_aligner"):
        blocks += list(getattr(model, name).blocks)
    blocks.append(model.diffloss.net)
    return blocks


def compile_for_training(model: nn.Module, mode: str) -> Callable:
    """Apply train.compile to a DREAM model; returns the callable the engine runs forward with."""
    check_mode(mode, "train.compile")
    if mode == "off":
        return model
    if mode == "block":
        compile_modules(model_blocks(model), "train.block")
        return model
    step = compiled(model.forward, "train.step")

    @functools.wraps(model.forward)
    def forward(*args, **kwargs):
        return step(*args, **kwargs)

    return forward


def skip_zero_dropout(model: nn.Module) -> int:
    """Replace every nn.Dropout of rate 0 by nn.Identity (no parameters or buffers, so state dicts
    are unchanged): a rate-0 dropout is the identity but still one dispatched op per call in
    training. Returns how many were replaced."""
    n = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p == 0.0:
                setattr(parent, name, nn.Identity())
                n += 1
    return n

