"""One rank of tests/test_train_faults.py: joins the process group from SLURM task variables only,
checks the world with one all-reduce, tries to lock a run directory the test holds (every rank must
refuse), then rank 1 stays away from a barrier so rank 0 meets the process-group timeout
(train.dist_timeout_s)."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    timeout_s, away_s, locked_dir = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    from pathlib import Path

    from dream_fast.dist import RunLockedError, init_distributed, lock_run_dir

    info = init_distributed(use_deepspeed=False, timeout_s=timeout_s)
    t = torch.tensor([float(info.rank)])
    dist.all_reduce(t)
    out = {"rank": info.rank, "world": info.world_size, "local_rank": info.local_rank, "sum": float(t.item()),
           "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}
    try:
        lock_run_dir(Path(locked_dir), info)
        out["lock"] = "taken"
    except RunLockedError as e:
        out["lock"] = str(e)
    if info.rank == 1:
        time.sleep(away_s)  # never reaches the barrier
    else:
        t0 = time.monotonic()
        try:
            dist.barrier()
            out["barrier"] = "passed"
        except Exception as e:  # noqa: BLE001 - the timeout is what we test
            out["barrier"] = f"{type(e).__name__}: {e}"[:300]
        out["barrier_s"] = time.monotonic() - t0
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # the peer is gone: no process-group teardown


if __name__ == "__main__":
    main()
