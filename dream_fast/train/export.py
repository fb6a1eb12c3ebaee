"""`dream-fast export`: EMA weights of a checkpoint -> one inference bundle (safetensors + config + tokenizer).

Reads only safetensors and JSON (no unpickling); the bundle loads with dream_fast.pretrained.load_pretrained.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dream_fast.config import config_from_dict
from dream_fast.data.bpe import BPETokenizer
from dream_fast.pretrained import save_pretrained
from dream_fast.train.checkpoint import load_ema, read_state, resolve_checkpoint


def export_checkpoint(run_dir_or_ckpt: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the EMA weights of a run's latest checkpoint (or of the given checkpoint) to out_dir."""
    ckpt = resolve_checkpoint(run_dir_or_ckpt)
    state = read_state(ckpt)
    cfg = config_from_dict(state["config"])
    tok_path = ckpt / "tokenizer.json"
    if not tok_path.is_file():
        tok_path = ckpt.parent.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {ckpt} or its run directory")
    return save_pretrained(load_ema(ckpt), cfg, BPETokenizer.from_file(tok_path), out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None, help="run directory or checkpoint directory")
    parser.add_argument("--checkpoint", dest="checkpoint_opt", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, help="output directory for the inference bundle")


def main(args: argparse.Namespace) -> int:
    src = args.checkpoint or args.checkpoint_opt
    if not src:
        raise ValueError("give the run or checkpoint directory to export")
    out = export_checkpoint(src, args.out)
    print(f"exported EMA weights of {resolve_checkpoint(src)} -> {out}")
    return 0
