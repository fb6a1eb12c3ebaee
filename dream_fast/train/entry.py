"""`dream-fast train` and `deepspeed --module dream_fast.train`: parse, build the config, train.

Kept small on purpose: the loop lives in trainer.py, checkpoints in checkpoint.py, engines in engine.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dream_fast.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="training YAML (may say `preset: tiny`); default: the tiny shapes preset")
    parser.add_argument("--resume", default=None, metavar="auto|DIR",
                        help="auto: continue from OUT_DIR/checkpoints/latest when present; DIR: a checkpoint "
                             "or run directory (default: train.resume)")
    parser.add_argument("--deepspeed-config", default=None, metavar="JSON",
                        help="DeepSpeed JSON merged over the generated one (train.deepspeed_config)")
    parser.add_argument("--out", default=None, help="run directory (train.out_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment is what we use
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. train.batch_size=32 optim.blr=2e-4")


def main(args: argparse.Namespace) -> int:
    from dream_fast.train.trainer import train

    preset = None if args.config else "tiny"
    cfg = load_config(args.config, args.overrides, preset=preset)
    if args.deepspeed_config:
        cfg.train.deepspeed_config = args.deepspeed_config
    if args.out:
        cfg.train.out_dir = args.out
    result = train(cfg, progress=not args.no_progress, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        write_status(result.out_dir, result)
    log = logging.getLogger("dream_fast.train")
    log.info("done: %d steps (%.2f epochs), stopped by %s; checkpoint %s; metrics %s", result.steps,
             result.epochs, result.stopped_by, result.checkpoint, result.metrics_path)
    if result.skipped_samples or result.skipped_shards:
        log.info("skipped %d samples and %d shard reads (corrupt or undecodable)", result.skipped_samples,
                 result.skipped_shards)
    return 0


STATUS = "last_run.json"


def write_status(out_dir: Path, result) -> None:
    """OUT_DIR/last_run.json: why the last run stopped ("signal": requeue it, see configs/slurm.example.sh)."""
    status = {"stopped_by": result.stopped_by, "steps": result.steps, "epochs": result.epochs,
              "checkpoint": str(result.checkpoint) if result.checkpoint else None}
    tmp = Path(out_dir) / f".{STATUS}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, Path(out_dir) / STATUS)


def cli(argv: list[str] | None = None) -> int:
    """`python -m dream_fast.train` (what the deepspeed launcher runs on every rank)."""
    parser = argparse.ArgumentParser(prog="python -m dream_fast.train", description="train DREAM")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from dream_fast.dist import RunLockedError, setup_environment

    try:
        setup_environment()  # SLURM task variables -> RANK etc. (the log prefix below names the rank)
    except ValueError as e:
        print(f"dream_fast.train: launch error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        return main(args)
    except ConfigError as e:
        print(f"dream_fast.train: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RunLockedError) as e:
        print(f"dream_fast.train: error: {e}", file=sys.stderr)
        return 2
