"""The GPU image's conditions on CPU: a plain copy of the tree (no install), optional packages missing.

The H200 image (docs/gpu.md) has torch, triton, numpy, transformers, safetensors and tokenizers, no
deepspeed/diffusers/webdataset/flash-attn/xformers, and runs `PYTHONPATH=. python3 -m
benchmarks.gpu_suite` from the checkout. Here a subprocess gets a copy of the files git would
check out, a clean environment with PYTHONPATH=<copy> only, the editable install's finder removed,
and an import hook that makes the optional packages (and transformers, scipy, PIL, which only
some paths use) unimportable. It imports the model, sampler, kernels and GPU suite from the copy,
runs one training forward/backward and one sampling call of the tiny preset.
"""

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

PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    here = Path.cwd().resolve()
    import dream_fast.kernels
    import dream_fast.kernels.adaln_block
    import dream_fast.model
    import dream_fast.sampling
    import benchmarks.gpu_suite
    for mod in (dream_fast.kernels, dream_fast.kernels.adaln_block, dream_fast.model, benchmarks.gpu_suite):
        assert Path(mod.__file__).resolve().is_relative_to(here), (mod.__name__, mod.__file__)
    assert set(dream_fast.kernels.OPS) <= set(benchmarks.gpu_suite.discover_ops()), "ops not discovered"
    for name in BLOCKED:
        assert name not in sys.modules, f"{name} was imported"
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{name} should be unimportable here")

    from dream_fast.config import get_preset
    from dream_fast.model.dream import build_model
    from dream_fast.model.masking import num_masked, random_orders
    from dream_fast.sampling.sampler import DreamSampler, draw_noise

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    m = cfg.model
    m.enc_depth = m.dec_depth = 1
    m.num_sampling_steps = 4
    model = build_model(m, cfg.loss)
    B, L = 2, m.seq_len
    tokens = torch.randn(B, L, m.token_dim)
    ids = torch.full((B, m.text_context), 2, dtype=torch.long)
    ids[:, 0] = 1
    out = model(tokens, ids, num_masked(0.75, L), random_orders(B, L, torch.device("cpu")))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]), out
    model.eval()
    with torch.no_grad():
        _, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
        noise = draw_noise([0, 1], 1, L, m.token_dim, m.num_sampling_steps)
        res = DreamSampler(model).sample(cond, noise, steps=2, cfg=2.0)
    assert res.tokens_BLC.shape == (B, L, m.token_dim) and torch.isfinite(res.tokens_BLC).all()
    print("BARE_OK", float(out["loss"]))
    """
)


def _bare_copy(dst: Path) -> Path:
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


def _run(args: list[str], root: Path, site: Path, timeout: float = 300) -> subprocess.CompletedProcess:
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


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bare")
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return _bare_copy(tmp), site


def test_bare_checkout_imports_and_runs_without_optional_packages(bare):
    root, site = bare
    assert not (root / ".venv").exists() and not list(root.glob("*.egg-info"))
    r = _run(["-c", f"BLOCKED = {BLOCKED!r}\n" + PROBE], root, site)
    assert r.returncode == 0 and "BARE_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]

