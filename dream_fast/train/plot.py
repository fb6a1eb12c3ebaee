"""`dream-fast plot RUN_DIR --out curves.png`: loss terms, mask ratio, lr and throughput from metrics.jsonl.

Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dream_fast.train.metrics import read_metrics

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "loss_diff")),
    ("contrastive loss", ("loss_clip",)),
    ("mask ratio", ("mask_ratio", "mu")),
    ("learning rate", ("lr",)),
    ("samples/s", ("samples_per_s",)),
    ("MFU", ("mfu",)),
)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Draw the curves of one run to a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    if not recs:
        raise ValueError(f"{run_dir}: metrics.jsonl has no records yet")
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for k in keys:
            ys = [r.get(k) for r in recs]
            pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")


def main(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out or Path(args.run_dir) / "curves.png")
    print(f"wrote {out}")
    return 0
