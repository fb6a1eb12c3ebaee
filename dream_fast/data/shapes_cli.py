"""`dream-fast shapes --out DIR --num-train N`: write the embedded captioned-shapes dataset as shards.

Reproducible (same arguments -> byte-identical tars) and resumable (complete shards are reused).
"""

from __future__ import annotations

import argparse

from dream_fast.data.shapes import write_shapes_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (train-*.tar, val-*.tar, heldout-*.tar)")
    parser.add_argument("--num-train", type=int, default=50000)
    parser.add_argument("--num-val", type=int, default=2000)
    parser.add_argument("--num-heldout", type=int, default=None, help="default: --num-val")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=5000)
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--max-shapes", type=int, default=1, help="shapes per image (1..9)")


def main(args: argparse.Namespace) -> int:
    heldout = args.num_val if args.num_heldout is None else args.num_heldout
    res = write_shapes_shards(args.out, args.num_train, args.num_val, heldout, seed=args.seed,
                              img_size=args.img_size, samples_per_shard=args.samples_per_shard,
                              image_format=args.format, progress=True, max_shapes=args.max_shapes)
    counts = res["counts"]
    print(f"{args.out}: train {counts['train']}, val {counts['val']}, heldout {counts['heldout']} samples "
          f"({res['written']} shards written, {res['reused']} reused)")
    return 0
