"""A bare checkout as the H200 image has it (docs/gpu.md): the files git would check out, no install,
and the optional packages unimportable. Shared by test_bare_checkout.py and test_gpu_suite.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = (
    "deepspeed",
    "diffusers",
    "webdataset",
    "flash_attn",
    "xformers",
    "transformers",
    "scipy",
    "PIL",
    "matplotlib",
    "tensorboard",
)

SITECUSTOMIZE = textwrap.dedent(
    f"""
    import importlib.abc
    import sys

    BLOCKED = {BLOCKED!r}

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (made unimportable by the test)", name=name)
            return None

    # The editable install's finder would resolve dream_fast to the worktree, not to the copy.
    # (setuptools registers the finder class itself, so its own __module__ names it.)
    def _editable(f):
        return "__editable__" in (getattr(f, "__module__", "") or "") + getattr(type(f), "__module__", "")

    sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
    sys.meta_path.insert(0, _Blocked())
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    """
)

def bare_copy(dst: Path) -> Path:
    """The files a checkout of this tree has: tracked plus untracked-but-not-ignored (git ls-files)."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs the git checkout to list its files: {e}")
    root = dst / "checkout"
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    return root


def run_bare(args: list[str], root: Path, site: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(site),
        "PYTHONPATH": f"{root}{os.pathsep}{site}",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )




def make_bare(tmp: Path) -> tuple[Path, Path]:
    """(checkout copy, folder holding the sitecustomize that blocks the optional packages)."""
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return bare_copy(tmp), site
