"""Optional dependencies imported on first use, so the model, sampler, kernels and GPU suite import
on a machine without them (the H200 image has no PIL, scipy, deepspeed, diffusers or webdataset;
docs/gpu.md). `Image = lazy_module("PIL.Image")` stands in for `from PIL import Image`: the first
attribute access imports the module, and a missing package raises there, naming what needs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule:
    __slots__ = ("_name", "_mod")

    def __init__(self, name: str):
        self._name = name
        self._mod: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._mod is None:
            try:
                self._mod = importlib.import_module(self._name)
            except ImportError as e:
                raise ModuleNotFoundError(
                    f"{self._name} is needed here but is not installed ({e}); pip install the project's "
                    f"dependencies (pyproject.toml) to use this path",
                    name=self._name.split(".")[0],
                ) from e
        return self._mod

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._mod is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_module(name: str) -> Any:
    """A stand-in for `import name` that imports on first attribute access."""
    return _LazyModule(name)
