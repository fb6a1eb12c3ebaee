"""`dream_fast.kernels` from a source checkout: the kernel modules live in the repo's top-level `kernels/`.

An installed wheel maps `dream_fast.kernels` onto `kernels/` (pyproject `package-dir`), so this
file is not shipped there. From a plain checkout (`PYTHONPATH=. python3 -m benchmarks.gpu_suite`
on a machine with no install step, docs/gpu.md) and from the editable install, Python finds this
package first; it adds `kernels/` to its search path and runs `kernels/__init__.py` here, so
`dream_fast.kernels.<op>` and the package's names are the same in all three cases.
"""

from __future__ import annotations

import os as _os

_REPO = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
_KERNELS_DIR = _os.path.join(_REPO, "kernels")
if not _os.path.isfile(_os.path.join(_KERNELS_DIR, "__init__.py")):
    raise ImportError(
        f"dream_fast.kernels: expected the kernel sources in {_KERNELS_DIR} (the repo's top-level kernels/); "
        "install the package (pip install -e .) or run from a full checkout"
    )
if _KERNELS_DIR not in __path__:
    __path__.append(_KERNELS_DIR)

# One package body for every layout: kernels/__init__.py is the source of OPS and the exports.
_init = _os.path.join(_KERNELS_DIR, "__init__.py")
with open(_init, encoding="utf-8") as _f:
    exec(compile(_f.read(), _init, "exec"), globals())  # noqa: S102
