"""`python -m dream_fast.train --config X.yaml` / `deepspeed --module dream_fast.train --config X.yaml`.

The same entry point as `dream-fast train`; the launcher's --local_rank argument is accepted.
"""

import os
import sys

from dream_fast.train.entry import cli

if __name__ == "__main__":
    rc = cli()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Multi-rank CPU runs: a communication thread (gloo / DeepSpeed's shm op) can abort at
        # interpreter shutdown ("terminate called without an active exception"; seen once in CI
        # after a finished, checkpointed run). Everything is on disk and the process group is
        # destroyed by now, so leave without running C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
