"""Checkpoints and faults: exact resume after SIGKILL, SIGTERM -> checkpoint + exit 0, non-finite
losses skipped then fatal, config errors before any work, export of the EMA weights."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import mini_config, subprocess_env, train_cmd, write_config
from safetensors.torch import load_file


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


@pytest.mark.slow
def test_resume_after_sigkill_matches_straight_run(tmp_path: Path) -> None:
    n = 3
    straight = write_config(
        tmp_path / "a.yaml",
        mini_config(tmp_path, train={"max_steps": 2 * n, "ckpt_every": n, "out_dir": str(tmp_path / "a")}),
    )
    broken = write_config(
        tmp_path / "b.yaml",
        mini_config(tmp_path, train={"max_steps": 2 * n, "ckpt_every": n, "out_dir": str(tmp_path / "b")}),
    )
    r = subprocess.run(train_cmd("--config", str(straight)), env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        train_cmd("--config", str(broken)),
        capture_output=True,
        text=True,
        env=subprocess_env(DREAM_FAST_FAULT=f"sigkill_after_checkpoint:{n}"),
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == f"step_{n:08d}"
    r = subprocess.run(
        train_cmd("--config", str(broken), "--resume", "auto"), env=subprocess_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 1))
    for step in range(n + 1, 2 * n + 1):  # the resumed half: same data, masks, noise, weights
        assert a[step] == pytest.approx(b[step], abs=1e-7, rel=0), (step, a[step], b[step])
    ema_a = load_file(str(tmp_path / "a" / "checkpoints" / f"step_{2 * n:08d}" / "ema.safetensors"))
    ema_b = load_file(str(tmp_path / "b" / "checkpoints" / f"step_{2 * n:08d}" / "ema.safetensors"))
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", mini_config(tmp_path, train={"max_steps": 100000, "ckpt_every": 100000}))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd("--config", str(cfg)),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] >= 2 and latest == f"step_{state['step']:08d}"
    assert "stopped by signal" in out


def test_config_errors_come_before_any_work(tmp_path: Path) -> None:
    bad = mini_config(tmp_path, data={"source": "webdataset"})  # no data.shards
    cfg = write_config(tmp_path / "bad.yaml", bad)
    r = subprocess.run(train_cmd("--config", str(cfg)), env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert "data.shards" in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "shapes").exists()
    r = subprocess.run(
        train_cmd("--config", str(cfg), "train.zero_stage=5"), env=subprocess_env(), capture_output=True, text=True
    )
    assert r.returncode == 2 and "train.zero_stage" in r.stderr


def test_nonfinite_loss_is_skipped_then_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dream_fast.model.dream import DREAM
    from dream_fast.train import export_checkpoint, train
    from dream_fast.train.trainer import NonFiniteLossError

    real_forward = DREAM.forward
    calls = {"n": 0, "bad": {2}}

    def flaky(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in calls["bad"]:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DREAM, "forward", flaky)
    from dream_fast.config import load_config

    path = write_config(tmp_path / "n.yaml", mini_config(tmp_path, train={"max_steps": 3, "ckpt_every": 100}))
    cfg = load_config(path)
    res = train(cfg, progress=False)
    assert res.steps == 3 and res.bad_steps == 1 and calls["n"] == 4  # the bad micro-batch was replaced
    bundle = export_checkpoint(res.out_dir, tmp_path / "export")
    assert {p.name for p in bundle.iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json"}

    calls["n"], calls["bad"] = 0, set(range(1, 100))
    cfg.train.max_bad_steps, cfg.train.out_dir, cfg.train.max_steps = 3, str(tmp_path / "run2"), 5
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        train(cfg, progress=False)


def test_logged_term_losses_average_only_the_steps_that_had_them(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """loss_diff is skipped below 50% masked and InfoNCE above 75%: their logged means leave those
    micro-batches out instead of averaging in zeros."""
    from dream_fast.config import load_config
    from dream_fast.train import train
    from dream_fast.train import trainer as trainer_mod

    seen: list[dict] = []
    real = trainer_mod.StepRunner.micro_step

    def record(self, inputs, n_masked, order):
        res = real(self, inputs, n_masked, order)
        seen.append(res)
        return res

    monkeypatch.setattr(trainer_mod.StepRunner, "micro_step", record)
    # mu 0.5, sigma 0.45: ratios spread over [0, 1], so both terms come and go within a logging window
    cfg = load_config(write_config(tmp_path / "c.yaml", mini_config(
        tmp_path, mask={"mu_start": 0.5, "mu_end": 0.5}, train={"max_steps": 12, "log_every": 12})))
    res = train(cfg, progress=False)
    assert 0 < sum(r["n_diff"] for r in seen) < 12 and 0 < sum(r["n_clip"] for r in seen) < 12, seen
    logged = res.history[-1]
    for term, flag in (("loss_diff", "n_diff"), ("loss_clip", "n_clip")):
        had = [r[term] for r in seen if r[flag]]
        assert logged[term] == pytest.approx(sum(had) / len(had), rel=1e-5)
        assert all(r[term] == 0.0 for r in seen if not r[flag])
