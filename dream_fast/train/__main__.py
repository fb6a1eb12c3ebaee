"""`python -m dream_fast.train --config X.yaml` / `deepspeed --module dream_fast.train --config X.yaml`.

The same entry point as `dream-fast train`; the launcher's --local_rank argument is accepted.
"""

from dream_fast.dist import exit_process
from dream_fast.train.entry import cli

if __name__ == "__main__":
    exit_process(cli())
