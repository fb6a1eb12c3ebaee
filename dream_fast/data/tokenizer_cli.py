"""`dream-fast tokenizer --shards PATTERN --vocab-size V --out tokenizer.json`: train a BPE on captions.

Reads only the .txt/.json members of the shards (no image decoding); set data.tokenizer_path to the
result to share one tokenizer between `dream-fast cache`, training and sampling.
"""

from __future__ import annotations

import argparse

from dream_fast.data.shards import train_tokenizer_from_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard pattern: brace pattern, glob, list or pipe: command")
    parser.add_argument("--vocab-size", type=int, default=49408, help="at most this many tokens (>= 259)")
    parser.add_argument("--out", required=True, help="path of the tokenizer.json to write")


def main(args: argparse.Namespace) -> int:
    tok = train_tokenizer_from_shards(args.shards, args.vocab_size, args.out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens (sot {tok.sot_id}, eot {tok.eot_id}, pad {tok.pad_id})")
    return 0
