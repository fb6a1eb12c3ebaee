"""Every CPU benchmark in one command (`make bench`): kernels' CPU providers, training step, sampler.

Rows go to benchmarks/results/cpu_<date>.csv; each section prints its own table. Run it on an
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
    args = ap.parse_args(argv)
    print(f"# CPU benchmarks, load average {os.getloadavg()}, rows -> {args.csv}")
    if "kernels" not in args.skip:
        for mod in (benchmark_masked_gather, benchmark_decoder_fill, benchmark_adaln_block,
                    benchmark_guided_ddpm_step):
            mod.main(["--csv", args.csv])
    if "train" not in args.skip:
        benchmark_train_step.main(["--csv", args.csv, "--threads", "2"])
    if "sampler" not in args.skip:
        benchmark_sampler.main(["--csv", args.csv, "--threads", "2"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
