"""Process-group setup for training: the same code under a launcher or alone in one process.

Without launcher variables a 1-rank group is created on a free loopback port (gloo on CPU, NCCL on
CUDA), so `dream-fast train` and `dream_fast.train.train()` need no `torchrun`/`deepspeed`.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def setup_environment() -> None:
    """Launcher variables for a lone process; CPU accelerator for DeepSpeed when there is no CUDA.

    DS_ACCELERATOR must be set before deepspeed is first imported (it picks its accelerator once).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def init_distributed(use_deepspeed: bool) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device."""
    setup_environment()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    created = False
    if not dist.is_initialized():
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        else:
            dist.init_process_group(backend=backend)
        created = True
    elif use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts the group
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
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
