"""Process-group setup for training: the same code under a launcher or alone in one process.

Without launcher variables a 1-rank group is created on a free loopback port (gloo on CPU, NCCL on
CUDA), so `dream-fast train` and `dream_fast.train.train()` need no `torchrun`/`deepspeed`.
Under `srun` (SLURM) without RANK the task variables are mapped (SLURM_PROCID -> RANK, ...). Every
collective has an explicit timeout (train.dist_timeout_s). One run directory is held by one
training process at a time (an advisory lock, `RunLock`), so processes that each became rank 0 of
a 1-rank world by mistake stop with an error instead of overwriting each other's checkpoints.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # train.dist_timeout_s default (also the default of torch's gloo groups)
LOCK_NAME = "train.lock"


class LaunchError(ValueError):
    """Launcher variables that cannot form a process group (what is missing and how to set it)."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool  # we made the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[003-005,9],cpu1" -> "gpu003", "a[1-2]-b[07-08]" -> "a1-b07"."""
    depth, first = 0, []
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        first.append(ch)
    item = "".join(first)

    def lowest(m: re.Match) -> str:
        return m.group(1).split(",")[0].split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", lowest, item)
    if not host or any(c in host for c in "[],"):
        raise LaunchError(f"cannot read the first host of SLURM_NODELIST={nodelist!r}; set MASTER_ADDR to "
                          "the first node's address (e.g. MASTER_ADDR=$(scontrol show hostnames | head -n1))")
    return host


def _slurm_environment() -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from `srun`'s task variables.

    SLURM_STEP_NUM_TASKS (set by srun for its step) is preferred over SLURM_NTASKS (the allocation),
    so a lone `python` in the batch script is a 1-rank run, not rank 0 of a world that never comes."""
    world = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
    if world is None:
        raise LaunchError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is: launch the "
                          "ranks with `srun` (one task per GPU), or set RANK and WORLD_SIZE yourself")
    rank, world_i = int(os.environ["SLURM_PROCID"]), int(world)
    if not 0 <= rank < world_i:
        raise LaunchError(f"SLURM_PROCID={rank} is not below the task count {world_i}")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_i),
           "LOCAL_RANK": os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK", "0"))}
    if world_i > 1 and "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or \
            os.environ.get("SLURM_NODELIST")
        if not nodes:
            raise LaunchError(f"a {world_i}-task SLURM step without MASTER_ADDR or SLURM_NODELIST: set MASTER_ADDR "
                              "to the first node's address (and MASTER_PORT to a free port) before `srun`")
        env["MASTER_ADDR"] = first_slurm_host(nodes)
    if world_i > 1 and "MASTER_PORT" not in os.environ:
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            raise LaunchError("a multi-task SLURM step without MASTER_PORT or SLURM_JOB_ID: set MASTER_PORT "
                              "(the same free port on every task)")
        env["MASTER_PORT"] = str(20000 + int(job) % 20000)  # the same on every task of the job
    os.environ.update(env)  # all or nothing: a refused launch leaves the environment as it was


def setup_environment() -> None:
    """Launcher variables for a lone process; SLURM task variables when RANK is unset; CPU accelerator
    for DeepSpeed when there is no CUDA.

    DS_ACCELERATOR must be set before deepspeed is first imported (it picks its accelerator once).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        if "SLURM_PROCID" in os.environ:
            _slurm_environment()
        else:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise LaunchError(f"train.dist_timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def init_distributed(use_deepspeed: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device.

    timeout_s bounds the rendezvous and every collective: a rank that waits longer on the others
    (a dead node, a rank stuck in I/O) raises instead of hanging the job."""
    setup_environment()
    timeout = datetime.timedelta(seconds=check_timeout(timeout_s))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    created = False
    t0 = time.monotonic()
    try:
        if not dist.is_initialized():
            if use_deepspeed:
                import deepspeed

                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, timeout=timeout)
            created = True
        elif use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=timeout)  # adopts the group
    except (RuntimeError, dist.DistError) as e:
        env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        raise RuntimeError(f"could not join the process group after {time.monotonic() - t0:.0f}s "
                           f"(train.dist_timeout_s={timeout_s:g}, {env}): {e}. Every rank must start with "
                           "the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from e
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            if n != 1:
                raise LaunchError(f"LOCAL_RANK={local_rank} but this process sees {n} GPUs; give each node as "
                                  "many tasks as GPUs, or one GPU per task (srun --gpus-per-task=1)")
            local_rank = 0  # one GPU per task (CUDA_VISIBLE_DEVICES already picked it)
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device, created)


def teardown(info: DistInfo) -> None:
    if info.created_group and dist.is_initialized():
        try:
            ds_comm = sys.modules.get("deepspeed.comm.comm")  # only if deepspeed was used
            if ds_comm is not None and ds_comm.is_initialized():
                ds_comm.destroy_process_group()  # also drops its cached sub-groups
        except Exception:  # noqa: BLE001 - deepspeed absent or already torn down
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_max(flag: float, device: torch.device) -> float:
    """Largest value of `flag` over ranks (stop/skip decisions every rank must share)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of a few host floats (logged losses) in one collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# One training process per run directory
# --------------------------------------------------------------------------------------------


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _launcher_hint() -> str:
    """What in the environment suggests a multi-rank launch that did not reach this process."""
    seen = [f"{k}={os.environ[k]}" for k in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                                              "PMI_SIZE", "LOCAL_WORLD_SIZE") if os.environ.get(k, "1") != "1"]
    return f" (this environment has {', '.join(seen)})" if seen else ""


_LOCK_FDS: set[int] = set()


def _close_lock_fds_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep the run lock alive after its parent died."""
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


class RunLock:
    """An exclusive advisory lock (flock) on OUT_DIR/train.lock, held by rank 0 while it trains.

    The kernel drops the lock when the holder dies (SIGKILL, node reboot of a local disk), so a
    requeued job never finds a stale lock; the file itself keeps the last holder's pid and host for
    the error message. File systems without flock (some Lustre mounts) get a warning, no lock."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        import fcntl

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
                   if holder else "another process")
            raise RunLockedError(
                f"train.out_dir {out_dir} is in use by {who}; lock file {path}. Two training processes would write "
                f"the same checkpoints. If you meant one multi-rank run, the launcher's variables did not reach the "
                f"ranks: each started as rank 0 of a 1-rank world{_launcher_hint()}; launch with `deepspeed`, "
                f"`torchrun` or `srun` (SLURM_PROCID/SLURM_NTASKS), or set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. "
                f"Otherwise give this run another train.out_dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            os.close(fd)
            log.warning("%s: the file system does not support flock (%s); two runs in one out_dir are not "
                        "detected", path, e)
            return cls(path, None)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _LOCK_FDS.add(fd)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            _LOCK_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_run_dir(out_dir: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank learns whether it could (one collective),
    so the other ranks stop with rank 0 instead of waiting for it until the timeout."""
    lock, err = None, None
    if info.is_main:
        try:
            lock = RunLock.acquire(out_dir)
        except RunLockedError as e:
            err = e
    if all_reduce_max(1.0 if err is not None else 0.0, info.device) > 0:
        if err is not None:
            raise err
        raise RunLockedError(f"rank 0 could not lock train.out_dir {out_dir} (see rank 0's error)")
    return lock


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------

# the scheduler's "checkpoint and leave" (SLURM --signal); DataLoader workers ignore them
# (dream_fast.data.shards.ignore_stop_signals_in_worker)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_process(rc: int) -> None:
    """Leave the interpreter with `rc` after a finished command.

    Multi-rank CPU runs: a communication thread (gloo / DeepSpeed's shm op) can abort at
    interpreter shutdown ("terminate called without an active exception"; seen in CI after a
    finished, checkpointed run). Everything is on disk and the process group is destroyed by
    then, so a launched rank leaves without running C++ static destructors.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
