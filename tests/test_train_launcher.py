"""The real `deepspeed` launcher on CPU: 2 local ranks (ZeRO-2, then resumed), and two launchers
with --no_ssh --node_rank 0|1 on loopback simulating a 2-node job (ZeRO-1)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import mini_config, subprocess_env, write_config

from dream_fast.dist import free_port

DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _launch(*args: str) -> list[str]:
    return [DEEPSPEED, *args, "--module", "dream_fast.train", "--no-progress"]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_deepspeed_launcher_two_local_ranks_and_resume(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", mini_config(tmp_path, train={"max_steps": 2, "zero_stage": 2}))
    run = tmp_path / "run"
    cmd = _launch("--num_accelerators", "2", "--master_port", str(free_port()))
    r = subprocess.run([*cmd, "--config", str(cfg)], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000002"
    assert {"data_rank0.json", "data_rank1.json", "rng_rank0.pt", "rng_rank1.pt", "deepspeed"} <= {
        p.name for p in ckpt.iterdir()}  # fmt: skip
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    cmd = _launch("--num_accelerators", "2", "--master_port", str(free_port()))
    r = subprocess.run(
        [*cmd, "--config", str(cfg), "--resume", "auto", "train.max_steps=3"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert _steps(run) == [1, 2, 3]


def test_deepspeed_two_simulated_nodes_on_loopback(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", mini_config(tmp_path, train={"max_steps": 2, "zero_stage": 1}))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = _launch(
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        )
        procs.append(
            subprocess.Popen(
                [*cmd, "--config", str(cfg)],
                env=subprocess_env(),
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    run = tmp_path / "run"
    assert _steps(run) == [1, 2]
    state = json.loads((run / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 1
