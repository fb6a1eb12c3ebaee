"""Turn benchmark CSVs into a markdown table (latest row per op/provider/mode/shape) and bar charts.

`python -m benchmarks.report [benchmarks/results/*.csv] [--out-dir benchmarks/results/plots]`.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from benchmarks.common import RESULTS_DIR, format_table, read_rows

KEY = ("op", "provider", "mode", "shape", "dtype", "device")


def latest_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Keep the newest row (by ISO date, then file order) for each op/provider/mode/shape/dtype/device."""
    best: dict[tuple, dict[str, str]] = {}
    for r in rows:
        k = tuple(r.get(c, "") for c in KEY)
        if k not in best or r.get("date", "") >= best[k].get("date", ""):
            best[k] = r
    return sorted(best.values(), key=lambda r: tuple(r.get(c, "") for c in KEY))


def with_speedup(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Adds `vs_ref`: reference p50 / this p50 for the same op/mode/shape/dtype/device."""
    ref = {
        tuple(r[c] for c in KEY if c != "provider"): float(r["p50_ms"])
        for r in rows
        if r["provider"] == "reference"
    }
    out = []
    for r in rows:
        base = ref.get(tuple(r[c] for c in KEY if c != "provider"))
        p50 = float(r["p50_ms"])
        out.append({**r, "vs_ref": f"{base / p50:.2f}x" if base and p50 > 0 else ""})
    return out


def plot(rows: list[dict[str, str]], out_dir: Path) -> list[Path]:
    """One PNG per (op, device, dtype, mode): grouped bars of p50 ms per shape, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["device"], r["dtype"], r["mode"])].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (op, device, dtype, mode), grp in sorted(groups.items()):
        shapes = sorted({r["shape"] for r in grp})
        provs = sorted({r["provider"] for r in grp})
        width = 0.8 / len(provs)
        fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(shapes)), 3.6))
        for i, p in enumerate(provs):
            ys = []
            for s in shapes:
                m = [float(r["p50_ms"]) for r in grp if r["provider"] == p and r["shape"] == s]
                ys.append(m[0] if m else math.nan)
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([s.replace(",", "\n") for s in shapes], fontsize=7)
        ax.set_ylabel("p50 ms (lower is better)")
        ax.set_title(f"{op} {mode} {dtype} on {device}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{op}_{mode}_{dtype}_{device}")
        path = out_dir / f"{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv", nargs="*", help="CSV files (default: every CSV in benchmarks/results)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR / "plots"))
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    files = [Path(p) for p in args.csv] or sorted(RESULTS_DIR.glob("*.csv"))
    if not files:
        raise SystemExit(f"no CSV files given and none in {RESULTS_DIR}")
    rows = []
    for f in files:
        rows += read_rows(f)
    rows = with_speedup(latest_rows(rows))
    table = format_table(
        rows,
        [
            "op",
            "provider",
            "mode",
            "shape",
            "dtype",
            "device",
            "p50_ms",
            "p20_ms",
            "p80_ms",
            "gbps",
            "tflops",
            "vs_ref",
            "git_sha",
        ],
    )
    print(table)
    if not args.no_plots:
        for p in plot(rows, Path(args.out_dir)):
            print(f"wrote {p}")
    return table


if __name__ == "__main__":
    main()
