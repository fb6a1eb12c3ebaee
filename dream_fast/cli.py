"""`dream-fast` command line: one subcommand per job, each implemented in its own module.

Every module named in COMMANDS exposes `add_arguments(parser)` and `main(args) -> int`; they are
imported lazily so `dream-fast --help` is instant and one broken extra never breaks the rest.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dream_fast.demo", "train, sample (K=1 and SAD) and evaluate a tiny DREAM on the embedded shapes data"),
    "shapes": ("dream_fast.data.shapes_cli", "write the embedded captioned-shapes dataset as webdataset shards"),
    "tokenizer": ("dream_fast.data.tokenizer_cli", "train a BPE tokenizer on the captions of image-text shards"),
    "train": ("dream_fast.train.entry", "train DREAM (one process, or many under the deepspeed launcher)"),
    "cache": ("dream_fast.train.cache", "pre-extract VAE moments, BPE ids and T5 embeddings into new shards"),
    "export": ("dream_fast.train.export", "write EMA weights + config + tokenizer of a checkpoint for inference"),
    "plot": ("dream_fast.train.plot", "draw loss and throughput curves of a run to PNG"),
    "sample": ("dream_fast.sampling.cli", "generate images from prompts (SAD, CFG, inpainting)"),
    "eval": ("dream_fast.eval.cli", "linear probe, zero-shot, retrieval, FID/IS, shapes attribute oracle"),
    "serve": ("dream_fast.serve.cli", "serve generation and embeddings over HTTP (batched; OpenAI-compatible)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dream-fast", description="Train and run DREAM fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    verbose = "-v" in argv[:1] or "--verbose" in argv[:1]
    if verbose:
        argv = argv[1:]
    name = argv[0]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dream-fast {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from dream_fast.config import ConfigError

    try:
        return int(module.main(args) or 0)
    except ConfigError as e:  # bad input: one clear line, no traceback from deep inside
        print(f"dream-fast {name}: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        if verbose:
            raise
        print(f"dream-fast {name}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script and `python -m dream_fast.cli` entry (also under the deepspeed launcher)."""
    from dream_fast.dist import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
