"""`dream-fast demo` at a few steps: same seed -> identical figures, a short run says so, --resume
continues it to the same weights as an uninterrupted run. In-process, tiny data and evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dream_fast import demo

STEPS = 6
EVAL = ["--prompts", "4", "--candidates", "2", "--probe-train", "256", "--probe-val", "64"]
# tiny data, and 4 sampling passes of 10 diffusion steps (the preset: 16 of 50) to keep generation cheap
DATA = ["data.shapes_num_train=512", "data.shapes_num_val=64", "sample.num_iter=4",
        "sample.sad_threshold=2", "model.num_sampling_steps=10"]


def run_demo(out: Path, *extra: str, overrides: list[str] = DATA) -> dict:
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--out", str(out), *extra, *overrides])
    assert demo.main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def figures(m: dict) -> dict:
    """Everything the run measured, without the timings."""
    gen = {name: {split: r["oracle"] for split, r in res.items()} for name, res in m["generation"].items()}
    return {"encoder": m["encoder"], "generation": gen, "steps": m["train"]["steps"],
            "loss_diff": m["train"]["loss_diff"], "loss_clip": m["train"]["loss_clip"]}


def weights(out: Path) -> dict[str, torch.Tensor]:
    (f,) = (out / "model").glob("*.safetensors")
    return load_file(str(f))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_a")
    return out, run_demo(out, "--steps", str(STEPS), *EVAL)


def test_same_seed_same_figures(first_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_a, a = first_run
    b = run_demo(tmp_path / "b", "--steps", str(STEPS), *EVAL)
    assert figures(a) == figures(b)
    assert a["train"]["steps"] == STEPS and a["train"]["seed"] == demo.DEMO_SEED
    console = capsys.readouterr().out
    assert f"seed {demo.DEMO_SEED}" in console and "[data]" in console and "[evaluation]" in console
    report = (out_a / "report.md").read_text()
    assert report.startswith(f"**SHORTENED RUN**: {STEPS} steps were planned (--steps), the demo's full count is "
                             f"{demo.DEMO_STEPS}")
    assert "# dream_fast demo report" in report and "SHORT RUN" not in report  # trained all it planned
    assert "## Against the reference run" in report and "## Machine" in report
    assert "![K = 1](samples_k1.png)" in report and "![loss curves](loss_curves.png)" in report
    assert (out_a / "run" / "checkpoints" / f"step_{STEPS:08d}").is_dir()


def test_short_run_says_so_and_resume_finishes_it(first_run, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out_a, _ = first_run
    out = tmp_path / "c"
    short = run_demo(out, "--steps", str(STEPS), "--minutes", "1e-6", "--skip-eval")
    assert short["train"]["steps"] == 1  # the budget ends the run after its first step
    report = (out / "report.md").read_text().splitlines()
    assert report[0].startswith(f"**SHORT RUN**: trained 1 of {STEPS} planned steps")
    assert f"`dream-fast demo --out {out} --resume`" in report[1]
    console = capsys.readouterr().out
    assert f"SHORT RUN: trained 1 of {STEPS}" in console and f"dream-fast demo --out {out} --resume" in console

    resumed = run_demo(out, "--resume", "--skip-eval", overrides=[])
    assert resumed["train"]["steps"] == STEPS
    assert "SHORT RUN" not in (out / "report.md").read_text()
    wa, wc = weights(out_a), weights(out)
    assert wa.keys() == wc.keys()
    for k in wa:  # resumed from step 1 to 6 == trained 0 to 6 in one go
        torch.testing.assert_close(wc[k], wa[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_to_change_the_plan(first_run) -> None:
    out_a, _ = first_run
    with pytest.raises(ValueError, match="--steps 7 would change its schedule"):
        run_demo(out_a, "--resume", "--steps", "7", overrides=[])
    with pytest.raises(FileNotFoundError, match="no demo run"):
        run_demo(out_a / "nothing_here", "--resume", overrides=[])


def test_reference_comparison_flags_a_real_difference() -> None:
    """Newcombe interval of a difference: excludes 0 for 90% vs 70% (n=200 each), not for 74% vs 73.5%."""
    lo, hi = demo.newcombe(0.9, 200, 0.7, 200)
    assert 0 < lo < 0.2 < hi
    lo, hi = demo.newcombe(0.74, 200, 0.735, 200)
    assert lo < 0 < hi
    ref_dir, _ = demo.reference_dir("bf16")
    ref = json.loads((ref_dir / "metrics.json").read_text())
    rows = demo.compare(ref, ref)
    assert len(rows) == 24 and not any(r["differs"] for r in rows)
