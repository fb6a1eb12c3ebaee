"""Every CPU benchmark in one command (`make bench`): kernels' CPU providers, training step, sampler.

Rows go to benchmarks/results/cpu_<date>.csv; each section prints its own table (the train and
sampler sections: dream_fast against the plain eager path of the same model in the same run). Run it on an
idle machine: 2-core timings are ruined by any other busy process (the load average is printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os

from benchmarks import (
    benchmark_adaln_block,
    benchmark_decoder_fill,
    benchmark_guided_ddpm_step,
    benchmark_masked_gather,
    benchmark_sampler,
    benchmark_train_step,
)
from benchmarks.common import RESULTS_DIR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--csv", default=str(RESULTS_DIR / f"cpu_{dt.date.today().isoformat()}.csv"))
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: kernels train sampler")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the train and sampler sections")
    ap.add_argument("--compile", nargs="*", default=[], choices=["block", "step"],
                    help="also time these torch.compile modes (Inductor; slow to compile on a shared CPU)")
    args = ap.parse_args(argv)
    extra = ["--compile", *args.compile] if args.compile else []
    print(f"# CPU benchmarks, load average {os.getloadavg()}, rows -> {args.csv}")
    if "kernels" not in args.skip:
        for mod in (benchmark_masked_gather, benchmark_decoder_fill, benchmark_adaln_block,
                    benchmark_guided_ddpm_step):
            mod.main(["--csv", args.csv])
    if "train" not in args.skip:
        benchmark_train_step.main(["--csv", args.csv, "--threads", str(args.threads), *extra])
    if "sampler" not in args.skip:
        benchmark_sampler.main(["--csv", args.csv, "--threads", str(args.threads), *extra])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
