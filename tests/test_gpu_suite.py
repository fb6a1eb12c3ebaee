"""benchmarks/gpu_suite.py: the plan a short GPU run executes, exercised on CPU (--dry-run).

The dry run goes through every step (ceilings, every op's correctness rows in each dtype, the
train-step and sampler hooks, op benchmarks, attention) at tiny sizes with the reference ops, from
a bare checkout with the optional packages unimportable, as on the H200 image (docs/gpu.md).
"""

from __future__ import annotations

import csv
import json

import pytest
from bare_helpers import make_bare, run_bare

from benchmarks import gpu_suite

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_suite")
    root, site = make_bare(tmp)
    out = tmp / "out"
    r = run_bare(["-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(out)], root, site)
    return r, out


def test_dry_run_from_a_bare_checkout_runs_every_step(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert [s for s in steps if s["status"] != "ok"] == []
    assert {s["section"] for s in steps} == {"ceilings", "correctness", "train step", "sampler", "op benchmarks",
                                             "attention"}
    with (out / "checks.csv").open() as f:
        checks = list(csv.DictReader(f))
    import dream_fast.kernels as k

    for op in k.OPS:  # every op, forward (+ gradients where it has them), in every dtype
        assert {c["dtype"] for c in checks if c["op"] == op} == {"bfloat16", "float16", "float32"}, op
        assert any(c["tensor"] == "out" for c in checks if c["op"] == op)
    assert any(c["tensor"].startswith("grad ") for c in checks)
    with (out / "results.csv").open() as f:
        ops = {row["op"] for row in csv.DictReader(f)}
    assert {"train_step", "sampler", "attention"} <= ops and set(k.OPS) <= ops


def test_dry_run_prints_a_short_summary_last(dry_run):
    r, out = dry_run
    text = (out / "summary.md").read_text()
    assert len(text) < gpu_suite.SUMMARY_MAX_CHARS and len(text.splitlines()) <= 45
    assert r.stdout.rstrip().endswith(f"files: {out}/")
    assert text.strip() in r.stdout
    assert "## correctness" in text and "## train step" in text and "## sampler" in text
    assert len(r.stdout) < 12_000, len(r.stdout)  # a device run returns the last 12 K characters
    assert (out / "suite.log").stat().st_size > 0


def test_budget_spent_skips_steps_and_still_writes_the_summary(tmp_path, capsys):
    rc = gpu_suite.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["steps"] and all(s["status"] == "skipped (budget)" for s in data["steps"])
    assert "skipped (budget)" in (tmp_path / "summary.md").read_text() or "skipped" in capsys.readouterr().out


def test_no_cuda_without_dry_run_says_what_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_suite.torch.cuda, "is_available", lambda: False)
    assert gpu_suite.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().out


def test_plan_checks_training_tiles_and_sampling_sizes():
    """The GPU plan checks adaln at > 4096 rows (BLOCK_M = 128) and each op's forward-only path."""
    shapes = gpu_suite.CHECK_SHAPES
    assert any(s["N"] > 4096 and grad for _, s, grad in shapes["adaln_block"])
    assert any(s["N"] <= 4096 and grad for _, s, grad in shapes["adaln_block"])
    for op, cases in shapes.items():
        assert any(not grad for _, _, grad in cases), op
    ops = gpu_suite.discover_ops()
    plan = gpu_suite.build_plan(ops, "gpu", ["bf16", "fp16", "fp32"], 2)
    names = [s.name for s in plan]
    assert sum(s.section == "correctness" for s in plan) == 3 * sum(len(shapes[o]) for o in ops)
    assert names.index("DREAM-B + tiny, bf16") < names.index(next(n for n in names if "torch.compile" in n))


def test_gpu_plan_times_every_triton_variant_in_one_step(monkeypatch):
    """An op whose benchmark lists TRITON_PROVIDERS gets all of them timed in its one GPU step (before
    and after on the same device and run), and the summary gives the default's ratio to each."""
    from benchmarks import benchmark_masked_gather as bm

    assert gpu_suite.triton_providers("masked_gather") == bm.TRITON_PROVIDERS and len(bm.TRITON_PROVIDERS) > 1
    seen: list[list[str]] = []

    def fake_run(op, setup, shapes, device, dtype, modes, providers, **kw):
        seen.append(list(providers))
        return [dict(op=op, provider=p, mode="fwd", shape="s", dtype="bfloat16", p50_ms=ms, gbps="")
                for p, ms in zip(providers, (4.0, 1.0, 2.0, 1.5))]

    monkeypatch.setattr(gpu_suite, "run_op_benchmarks", fake_run)
    monkeypatch.setattr(gpu_suite, "providers_for", lambda device: ["reference", "compiled", "triton"])
    plan = gpu_suite.build_plan({"masked_gather": gpu_suite.discover_ops()["masked_gather"]}, "gpu", ["bf16"], 1)
    step = next(s for s in plan if s.section == "op benchmarks" and "torch.compile" not in s.name)
    assert all(p in step.name for p in bm.TRITON_PROVIDERS), step.name
    env = dict(device="dev", torch="t", triton="3.6.0", git_sha="x", date="d")
    ctx = gpu_suite.Ctx("cpu", "gpu", env, gpu_suite.Log(None), deadline=1e12, reps=1, max_shapes=1)
    step.rows = step.run(ctx)
    assert seen == [["reference", *bm.TRITON_PROVIDERS]]
    assert gpu_suite.bench_providers("dry-run", bm.TRITON_PROVIDERS, False) == ["reference"]
    text, _ = gpu_suite.summarize([step], ctx, 1.0, 1.0)
    line = next(ln for ln in text.splitlines() if ln.startswith("- masked_gather fwd"))
    assert "triton 1.000 4.00x" in line and "triton-baseline 2.000 2.00x (triton 2.00x)" in line, line
