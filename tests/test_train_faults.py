"""Faults at scale (docs/training.md, "Running at scale"): the process-group timeout, SLURM task
variables, one training process per run directory, scheduler signals reaching DataLoader workers,
SIGUSR1 = checkpoint and exit, and no tokenizer training behind a barrier on many ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _train_helpers import ROOT, mini_config, subprocess_env, train_cmd, write_config

from dream_fast import dist as D
from dream_fast.config import ConfigError, load_config

SLURM_KEYS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_NPROCS", "SLURM_LOCALID",
              "SLURM_NODELIST", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_JOB_ID")


def _shards(tmp: Path, n: int = 64, per_shard: int = 16) -> str:
    from dream_fast.data.shapes import write_shapes_shards

    write_shapes_shards(tmp / "shards", n, 8, 8, seed=3, img_size=16, samples_per_shard=per_shard, progress=False)
    return str(tmp / "shards" / f"train-{{00000..{n // per_shard - 1:05d}}}.tar")


# --------------------------------------------------------------------------------------------
# Process-group timeout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -5, "soon"])
def test_dist_timeout_is_validated(tmp_path: Path, bad) -> None:
    from dream_fast.train.trainer import check_config

    cfg = load_config(write_config(tmp_path / "c.yaml", mini_config(tmp_path, train={"dist_timeout_s": 60})))
    check_config(cfg, 1)
    cfg.train.dist_timeout_s = bad
    with pytest.raises(ConfigError, match="train.dist_timeout_s"):
        check_config(cfg, 1)


def _slurm_free_job_id() -> tuple[int, int]:
    """(SLURM_JOB_ID, the port it maps to) with that port free now."""
    for _ in range(200):
        port = D.free_port()
        if 20000 <= port < 40000:
            return port - 20000, port
    pytest.skip("no free port in 20000-39999 to stand in for a SLURM job's derived MASTER_PORT")


def test_slurm_ranks_join_and_a_missing_rank_times_out(tmp_path: Path) -> None:
    """Two processes with only srun's variables form a 2-rank group; both refuse a run directory
    another process holds (rank 0 names the holder, rank 1 follows rank 0 instead of waiting for it);
    rank 1 then stays away from a barrier: rank 0 raises after train.dist_timeout_s (2 s) instead of
    waiting for it (6 s)."""
    job, port = _slurm_free_job_id()
    held = D.RunLock.acquire(tmp_path / "busy")
    procs = []
    for rank in (0, 1):
        env = subprocess_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                             SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job))
        for k in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_NODELIST"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "_faults_worker.py"), "2", "6",
                                       str(tmp_path / "busy")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    held.release()
    res = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        res.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for rank, r in enumerate(res):
        assert (r["rank"], r["world"], r["local_rank"], r["sum"]) == (rank, 2, rank, 1.0)
        assert r["env"]["MASTER_ADDR"] == "localhost" and r["env"]["MASTER_PORT"] == str(port)
    assert f"pid {os.getpid()}" in res[0]["lock"], res[0]["lock"]
    assert "rank 0 could not lock" in res[1]["lock"], res[1]["lock"]
    assert "Timed out" in res[0]["barrier"], res[0]  # gloo's words for the process-group timeout
    assert res[0]["barrier_s"] < 5.0, res[0]  # bounded by the 2 s timeout, not by rank 1's 6 s away


def test_slurm_variables_map_when_rank_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", *SLURM_KEYS):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[012-015,020],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "71234")
    D.setup_environment()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == [
        "5", "16", "1", "gpu012", str(20000 + 71234 % 20000)]  # fmt: skip
    # srun's own step size wins over the allocation's (a lone python in the batch script is 1 rank)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    D.setup_environment()
    assert os.environ["WORLD_SIZE"] == "1"
    # a launcher's RANK is never overridden
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    D.setup_environment()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")


def test_slurm_without_a_nodelist_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", *SLURM_KEYS):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(D.LaunchError, match="MASTER_ADDR"):
        D.setup_environment()
    monkeypatch.setenv("SLURM_PROCID", "4")
    with pytest.raises(D.LaunchError, match="SLURM_PROCID=4"):
        D.setup_environment()


@pytest.mark.parametrize(("nodes", "first"), [("node7", "node7"), ("gpu[003-005,9],cpu1", "gpu003"),
                                              ("a[1-2]-b[07-08]", "a1-b07"), ("x1,x2", "x1"), ("r[9]", "r9")])
def test_first_slurm_host(nodes: str, first: str) -> None:
    assert D.first_slurm_host(nodes) == first


# --------------------------------------------------------------------------------------------
# One training process per run directory
# --------------------------------------------------------------------------------------------


def test_run_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    (tmp_path / D.LOCK_NAME).write_text('{"pid": 1, "host": "gone"}')  # a dead holder's file: not a lock
    held = D.RunLock.acquire(tmp_path)
    with pytest.raises(D.RunLockedError) as e:
        D.RunLock.acquire(tmp_path)
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and str(tmp_path / D.LOCK_NAME) in msg and "rank 0 of a 1-rank" in msg
    held.release()
    D.RunLock.acquire(tmp_path).release()


def test_run_lock_dies_with_its_holder_not_with_its_workers(tmp_path: Path) -> None:
    """The holder dies without releasing (SIGKILL, os._exit) while a forked child (a DataLoader worker)
    lives on: the lock is free at once, so a requeued job is not refused."""
    code = ("import multiprocessing as mp, os, sys, time\n"
            "from pathlib import Path\n"
            "from dream_fast.dist import RunLock\n"
            f"RunLock.acquire(Path({str(tmp_path)!r}))\n"
            "child = mp.get_context('fork').Process(target=time.sleep, args=(60,), daemon=False)\n"
            "child.start()\n"
            f"Path({str(tmp_path / 'child')!r}).write_text(str(child.pid))\n"
            "os._exit(0)\n")  # fmt: skip
    # no pipes: the child would hold them open
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 0
    child = int((tmp_path / "child").read_text())
    try:
        os.kill(child, 0)  # still alive
        D.RunLock.acquire(tmp_path).release()
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_second_rank0_refused_and_sigusr1_to_the_job_checkpoints(tmp_path: Path) -> None:
    """A streamed run with 2 DataLoader workers: a second process on the same out_dir (what ranks that
    never saw their launcher's variables would be) is refused while the first trains; SIGUSR1 to the
    whole process group (as SLURM's --signal sends it, workers included) checkpoints and exits 0."""
    shards = _shards(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", mini_config(
        tmp_path, data={"source": "webdataset", "shards": shards, "num_workers": 2, "shuffle_buffer": 8,
                        "hflip": False},
        train={"max_steps": 100000, "ckpt_every": 100000, "grad_accum": 2}))  # fmt: skip
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd("--config", str(cfg)), env=subprocess_env(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        second = subprocess.run(train_cmd("--config", str(cfg)), env=subprocess_env(), capture_output=True,
                                text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {first.pid}" in second.stderr and str(run / D.LOCK_NAME) in second.stderr
        assert first.poll() is None  # the holder trains on
        os.killpg(first.pid, signal.SIGUSR1)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    assert "stopped by signal" in out
    status = json.loads((run / "last_run.json").read_text())
    assert status["stopped_by"] == "signal"
    state = json.loads((Path(status["checkpoint"]) / "trainer_state.json").read_text())
    assert state["step"] == status["steps"] >= 2


# --------------------------------------------------------------------------------------------
# DataLoader workers and scheduler signals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_loader_workers_survive_the_schedulers_signal(tmp_path: Path, sig: int) -> None:
    from dream_fast.data.shards import ImageTextShards
    from dream_fast.data.streams import LoaderStream

    shards = _shards(tmp_path)

    def stream() -> LoaderStream:
        ds = ImageTextShards(shards, img_size=16, shuffle_buffer=4, seed=1, rank=0, world_size=1)
        return LoaderStream(ds, batch_size=4, num_workers=2, epoch_size=64)

    ref = stream()
    want = [k for _ in range(16) for k in next(ref)["key"]]  # one epoch, never signalled
    got_stream = stream()
    got = list(next(got_stream)["key"])
    pids = [w.pid for w in got_stream._it._workers]
    for pid in pids:
        os.kill(pid, sig)
    time.sleep(0.5)
    for _ in range(15):
        got += next(got_stream)["key"]
    assert got == want
    assert all(w.is_alive() for w in got_stream._it._workers)


def test_a_process_exits_with_its_loader_workers_still_running(tmp_path: Path) -> None:
    """Workers that ignore one SIGTERM must not hang the interpreter's exit (multiprocessing's exit
    hook terminates daemonic children with one SIGTERM and joins them)."""
    shards = _shards(tmp_path, n=32)
    code = ("from dream_fast.data.shards import ImageTextShards\n"
            "from dream_fast.data.streams import LoaderStream\n"
            f"ds = ImageTextShards({shards!r}, img_size=16, shuffle_buffer=4, rank=0, world_size=1)\n"
            "s = LoaderStream(ds, batch_size=4, num_workers=2, epoch_size=32)\n"
            "next(s)\nprint('one batch', flush=True)\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "one batch" in r.stdout, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Tokenizer on many ranks
# --------------------------------------------------------------------------------------------


def test_multi_rank_streamed_run_needs_a_tokenizer_first(tmp_path: Path) -> None:
    from dream_fast.data.setup import check_data_config

    cfg = load_config(write_config(tmp_path / "c.yaml", mini_config(
        tmp_path, data={"source": "webdataset", "shards": "/data/x-{000..009}.tar"})))  # fmt: skip
    check_data_config(cfg, 1)  # one rank trains it itself
    with pytest.raises(ConfigError, match=r"data.tokenizer_path.*dream-fast tokenizer"):
        check_data_config(cfg, 4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_text("{}")  # trained by an earlier run of this out_dir
    check_data_config(cfg, 4)
