"""dream_fast: train and run DREAM fast (encoder + text-to-image generator in one model).

The public API, imported on first use (so `import dream_fast` stays light):

    from dream_fast import DreamPipeline, load_config, load_pretrained
    from dream_fast.train import train          # `dream_fast.train` is the training package itself
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "DreamPipeline": "dream_fast.sampling.pipeline",
    "load_config": "dream_fast.config",
    "load_pretrained": "dream_fast.pretrained",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dream_fast' has no attribute {name!r}")
