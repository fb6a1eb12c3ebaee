"""Elastic resume: a checkpoint moves between world sizes and engines, and the run keeps its schedule.

1. The portable engine state (fp32 weights + Adam moments by parameter name) round-trips exactly through
   DeepSpeed ZeRO-1/2/3 on 1 and 2 gloo ranks, and a ZeRO engine loaded from a plain-PyTorch state takes
   the same next AdamW step as the PyTorch engine (tests/_elastic_worker.py).
2. End to end: 2 ranks (ZeRO-2) -> 1 rank (plain PyTorch) -> 2 ranks, with the lr in warmup: the lr,
   Masking Warmup and the stop follow the samples seen, not the optimizer steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import mini_config, run_ranks, subprocess_env, train_cmd, write_config
from safetensors.torch import load_file

from dream_fast.dist import free_port

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_elastic_worker.py"
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_portable_state_round_trips_through_every_zero_stage(tmp_path: Path) -> None:
    run_ranks("_elastic_worker.py", 1, str(tmp_path))
    run_ranks("_elastic_worker.py", 2, str(tmp_path))
    written = load_file(str(tmp_path / "portable_w1.safetensors"))
    assert any(k.startswith("exp_avg_sq.") and float(v.abs().max()) > 0 for k, v in written.items())
    torch_next = load_file(str(tmp_path / "torch_next.safetensors"))
    for stage in (1, 2, 3):
        for world in (1, 2):
            back = load_file(str(tmp_path / f"back_w{world}_z{stage}.safetensors"))
            assert _max_diff(back, written) == 0.0, (stage, world)
        # the next step after loading: Adam's bias correction needs the step count, the update both moments
        assert _max_diff(load_file(str(tmp_path / f"next_w1_z{stage}.safetensors")), torch_next) < 1e-6, stage


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_resume_on_another_world_size_keeps_the_sample_schedule(tmp_path: Path) -> None:
    # 128 training samples, batch 8 per rank; lr warmup over 0.75 epoch = 96 samples; 4 steps at global batch 16
    cfg = write_config(tmp_path / "c.yaml", mini_config(
        tmp_path, train={"max_steps": 4, "zero_stage": 2, "ckpt_every": 2},
        optim={"lr": 1e-3, "warmup_epochs": 0.75}))  # fmt: skip
    run = tmp_path / "run"
    ds = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), "--module", "dream_fast.train",
          "--no-progress", "--config", str(cfg)]
    _run([*ds, "train.max_steps=2"])  # stop half way, as a preempted job would
    assert (run / "checkpoints" / "step_00000002" / "portable.safetensors").is_file()

    # 2 ranks -> 1 (plain PyTorch engine): the remaining 32 samples of the plan take 4 steps of 8
    out = _run([*train_cmd("--config", str(cfg), "--resume", "auto"), "train.zero_stage=0"])
    assert "Adam moments from portable.safetensors" in out
    m = _metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    samples = [16, 32, 40, 48, 56, 64]  # samples seen after each step
    for rec, done in zip(m, samples):
        want = 1e-3 * min(done / 96, 1.0)  # per-step warmup would give 1e-3 * (step / 6) after the resume
        assert rec["lr"] == pytest.approx(want, rel=1e-6), (rec["step"], rec["lr"], want)
        assert rec["epoch"] == pytest.approx(done / 128, abs=1e-4)

    # 1 rank -> 2 ranks (ZeRO-2) with a longer plan: 5 steps at the starting global batch 16 = 80 samples
    ds[4] = str(free_port())
    out = _run([*ds, "--resume", "auto", "train.max_steps=5"])
    assert "Adam moments from portable.safetensors" in out
    m = _metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6, 7]
    assert m[-1]["epoch"] == pytest.approx(80 / 128, abs=1e-4)
    state = json.loads((run / "checkpoints" / "step_00000007" / "trainer_state.json").read_text())
    assert (state["world_size"], state["samples_seen"], state["plan_global_batch"]) == (2, 80, 16)
