"""Time to the first batch after a mid-epoch resume: replaying the stream up to the saved batch (what
resume did before reader positions) against starting each DataLoader worker at its saved position.

    python -m benchmarks.resume_data_position [--shards 8] [--per-shard 500] [--cut 100] [--workers 2]

Writes shapes shards (32 px png) to a temporary directory, runs `cut` batches of 32, saves the
stream's state, and times a fresh stream to its first batch both ways (each in a new stream, same
state). Prints seconds and the ratio; also the size of the saved position (JSON bytes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--cut", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--buffer", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dream_fast.data.shapes import write_shapes_shards
    from dream_fast.data.shards import ImageTextShards
    from dream_fast.data.streams import LoaderStream

    n = args.shards * args.per_shard
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_shards(Path(tmp), n, 0, 0, seed=0, img_size=32, samples_per_shard=args.per_shard, progress=False)
        pattern = str(Path(tmp) / f"train-{{00000..{args.shards - 1:05d}}}.tar")

        def stream() -> LoaderStream:
            ds = ImageTextShards(pattern, img_size=32, hflip=True, shuffle_buffer=args.buffer, seed=0, rank=0,
                                 world_size=1)
            return LoaderStream(ds, args.batch, args.workers, n)

        s = stream()
        for _ in range(args.cut):
            next(s)
        state = json.loads(json.dumps(s.state()))
        del s
        replay_state = {"epoch": state["epoch"], "batch": state["batch"]}  # no positions: the old resume
        times = {}
        for name, st in (("replay", replay_state), ("positions", state)):
            r = stream()
            r.load_state(st)
            t0 = time.perf_counter()
            next(r)
            times[name] = time.perf_counter() - t0
            del r
    print(f"resume at batch {args.cut} (batch {args.batch}, {args.workers} workers, {args.shards} shards x "
          f"{args.per_shard} samples, shuffle buffer {args.buffer}): time to the first batch")
    print(f"  replay    {times['replay']:.2f} s")
    print(f"  positions {times['positions']:.2f} s   ({times['replay'] / times['positions']:.1f}x faster)")
    print(f"  saved position: {len(json.dumps(state))} bytes of JSON for {args.workers} workers")


if __name__ == "__main__":
    main()
