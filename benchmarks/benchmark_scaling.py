"""How cost grows: training-step time against batch and tokens per image, sampling latency against
batch and SAD K, each point dream_fast (fast paths on) beside the plain eager path of the same model
in the same run (calls interleaved, so load drift biases both alike).

`python -m benchmarks.benchmark_scaling [--preset tiny] [--reps 3] [--quick] [--out DIR]`
writes DIR/table.md, DIR/rows.csv and DIR/scaling.png (matplotlib, Agg). Tokens per image are set
through the preset's img_size / patch_size (patch kept, image side scaled: same token_dim, L =
(img/patch)^2). Training: the trainer's own step (benchmarks.benchmark_train_step.setup, fp32, mask
ratio 0.75); sampling: text conditioning + the generation loop (benchmarks.benchmark_sampler,
T = N/2 for K > 1, image decoding excluded). "plain" = TorchEngine(fast=False) /
DreamSampler(fast=False). Random weights; CPU, threads as given (default 1).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import benchmark_sampler as bs
from benchmarks import benchmark_train_step as bt
from benchmarks.common import env_info, format_table, interleaved
from dream_fast import config as dconfig

COLUMNS = ["part", "batch", "tokens", "K", "plain_ms", "fast_ms", "speedup", "fast_ms_per_sample", "fast_vs_first"]


def cpu_description() -> str:
    """CPU model and the SIMD flags that matter for these timings (lscpu, else /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                model = v.strip()
            elif k.strip() == "Flags":
                flags = v
    except (OSError, subprocess.SubprocessError):
        pass
    if not flags and Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.partition(":")[2]
                break
    keep = [f for f in flags.split() if f.startswith(("avx", "amx", "fma", "f16c"))]
    return f"{model}, {os.cpu_count()} logical CPUs, flags {' '.join(sorted(keep)) or 'unknown'}"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def variant(preset: str, tokens: int, quick: bool) -> str:
    """Register (once) and return the name of `preset` resized to `tokens` tokens per image."""
    name = f"_scaling_{preset}_{tokens}{'_q' if quick else ''}"
    if name in dconfig.PRESETS:
        return name
    base = dconfig.get_preset(preset)
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"tokens per image must be a square (64, 256, ...), got {tokens}")

    def make() -> dconfig.DreamConfig:
        cfg = dconfig.get_preset(preset)
        m = cfg.model
        m.img_size = side * m.patch_size
        if quick:  # smoke-test sizes: the code path, not a measurement
            m.enc_width = m.dec_width = m.text_width = m.diffloss_w = 32
            m.enc_depth = m.dec_depth = m.text_depth = m.aligner_depth = 1
            m.enc_heads = m.dec_heads = m.text_heads = 2
            m.proj_hidden, m.proj_dim, m.diffloss_d, m.num_sampling_steps = 32, 16, 1, 4
            cfg.sample.num_iter, cfg.sample.sad_threshold = 4, 2
        return cfg

    if base.model.img_size // base.model.patch_size != side or quick:
        dconfig.PRESETS[name] = make
        dconfig.get_preset(name)  # validates now: a bad size fails before any timing
        return name
    return preset


def train_points(preset: str, batches: list[int], tokens: list[int], reps: int, quick: bool, log=print) -> list[dict]:
    rows = []
    dev = torch.device("cpu")
    for L in tokens:
        name = variant(preset, L, quick)
        for B in batches:
            plain, _, _ = bt.setup(name, dev, B, "fp32", fast=False)
            fast, _, _ = bt.setup(name, dev, B, "fp32", fast=True)
            t0 = time.perf_counter()
            tp, tf = interleaved(plain, fast, reps, warmup=1)
            rows.append(_row("train step", B, L, "", tp["p50"], tf["p50"]))
            log(f"[train B={B} L={L}] plain {tp['p50']:.1f} ms, fast {tf['p50']:.1f} ms "
                f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def sample_points(preset: str, batches: list[int], ks: list[int], reps: int, quick: bool, log=print) -> list[dict]:
    rows = []
    name = variant(preset, dconfig.get_preset(preset).model.seq_len, quick)
    cfg, model = bs.build(name)
    N = cfg.sample.num_iter
    L = cfg.model.seq_len
    grid = [(B, 1) for B in batches] + [(batches[0], K) for K in ks if K != 1]
    for B, K in grid:
        T = None if K == 1 else N // 2
        plain = bs.sampler_call(cfg, model, B, K, T, False, fast=False)
        fast = bs.sampler_call(cfg, model, B, K, T, False, fast=True)
        t0 = time.perf_counter()
        tp, tf = interleaved(plain, fast, reps, warmup=1)
        part = "sampling (K=1)" if K == 1 else f"sampling SAD T={T}"
        rows.append(_row(part, B, L, K, tp["p50"], tf["p50"]))
        log(f"[sample B={B} K={K}] plain {tp['p50']:.0f} ms, fast {tf['p50']:.0f} ms "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def _row(part: str, B: int, L: int, K: Any, plain_ms: float, fast_ms: float) -> dict[str, Any]:
    return {"part": part, "batch": B, "tokens": L, "K": K, "plain_ms": round(plain_ms, 2),
            "fast_ms": round(fast_ms, 2), "speedup": round(plain_ms / fast_ms, 2),
            "fast_ms_per_sample": round(fast_ms / B, 2)}


def add_growth(rows: list[dict]) -> None:
    """fast_vs_first: fast time over the first point of the same series (how cost grows)."""
    first: dict[tuple, float] = {}
    for r in rows:
        if r["part"] == "train step":
            key: tuple = (r["part"], r["tokens"])
        else:
            key = ("sampling K=1",) if r["K"] == 1 else ("sampling SAD",)
        r["fast_vs_first"] = f"{r['fast_ms'] / first.setdefault(key, r['fast_ms']):.2f}x"
    # SAD rows read against K=1 at the same batch
    k1 = {r["batch"]: r["fast_ms"] for r in rows if r["part"] == "sampling (K=1)"}
    for r in rows:
        if r["part"].startswith("sampling SAD") and r["batch"] in k1:
            r["fast_vs_first"] = f"{r['fast_ms'] / k1[r['batch']]:.2f}x vs K=1"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    tr = [r for r in rows if r["part"] == "train step"]
    for i, L in enumerate(sorted({r["tokens"] for r in tr})):
        s = [r for r in tr if r["tokens"] == L]
        c = f"C{i}"
        axes[0].plot([r["batch"] for r in s], [r["plain_ms"] for r in s], "o--", color=c, label=f"plain, {L} tok")
        axes[0].plot([r["batch"] for r in s], [r["fast_ms"] for r in s], "s-", color=c, label=f"dream_fast, {L} tok")
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms / train step", title="training step")
    s1 = [r for r in rows if r["part"] == "sampling (K=1)"]
    axes[1].plot([r["batch"] for r in s1], [r["plain_ms"] for r in s1], "o--", label="plain")
    axes[1].plot([r["batch"] for r in s1], [r["fast_ms"] for r in s1], "s-", label="dream_fast")
    axes[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="ms / sampling call", title="sampling, K=1")
    b0 = s1[0]["batch"] if s1 else 1
    sk = [r for r in rows if r["part"] != "train step" and r["batch"] == b0]
    axes[2].plot([r["K"] for r in sk], [r["plain_ms"] for r in sk], "o--", label="plain")
    axes[2].plot([r["K"] for r in sk], [r["fast_ms"] for r in sk], "s-", label="dream_fast")
    axes[2].set(xlabel="SAD K (candidates)", ylabel="ms / sampling call", title=f"sampling, SAD K, batch {b0}")
    for ax, xs in ((axes[0], [r["batch"] for r in tr]), (axes[1], [r["batch"] for r in s1]),
                   (axes[2], [r["K"] for r in sk])):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted(set(xs)))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out: Path, preset: str) -> list[dict]:
    """Redraw out/scaling.png from out/rows.csv (the numbers of an earlier run, unchanged)."""
    with (out / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("batch", "tokens"):
            r[k] = int(r[k])
        r["K"] = int(r["K"]) if r["K"] else ""
        for k in ("plain_ms", "fast_ms"):
            r[k] = float(r[k])
    plot(rows, out / "scaling.png", f"preset {preset}, from {out.name}/rows.csv, {cpu_description()[:80]}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timed calls per point (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-batches", nargs="+", type=int, default=[2, 4, 16, 64],
                    help="training batches (from 2: the projection head's BatchNorm needs > 1 sample)")
    ap.add_argument("--tokens", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--sample-batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 3, 5, 8])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: train batch 2, sample batch 1, 64 tokens, K 1 and 3, 1 rep, tiny widths "
                         "(checks the code path)")
    ap.add_argument("--out", default=None, help="write table.md, rows.csv, scaling.png here")
    ap.add_argument("--replot", default=None, metavar="DIR", help="only redraw DIR/scaling.png from DIR/rows.csv")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(Path(args.replot), args.preset)
    if args.quick:
        args.train_batches, args.tokens, args.sample_batches, args.ks, args.reps = [2], [64], [1], [1, 3], 1
    for name, vals in (("train-batches", args.train_batches), ("sample-batches", args.sample_batches),
                       ("ks", args.ks), ("tokens", args.tokens)):
        if any(v < 1 for v in vals):
            raise SystemExit(f"--{name} must be positive integers, got {vals}")
    torch.set_num_threads(args.threads)
    env = env_info("cpu")
    cpu = cpu_description()
    load0 = _load()
    print(f"# {cpu}; torch {env['torch']}, {args.threads} threads, git {env['git_sha']}, load before {load0}",
          flush=True)
    t0 = time.perf_counter()
    try:
        rows = train_points(args.preset, args.train_batches, args.tokens, args.reps, args.quick)
        rows += sample_points(args.preset, args.sample_batches, args.ks, args.reps, args.quick)
    finally:  # the resized presets were for this run only: leave the preset table as it was
        for name in [n for n in dconfig.PRESETS if n.startswith("_scaling_")]:
            del dconfig.PRESETS[name]
    add_growth(rows)
    load1 = _load()
    head = (f"How cost grows, preset {args.preset}{' (quick widths)' if args.quick else ''}, fp32, random weights. "
            f"CPU: {cpu}. torch {env['torch']}, {args.threads} thread(s), git {env['git_sha']}, "
            f"{args.reps} interleaved reps per point (p50), load avg before {load0}, after {load1}, "
            f"total {time.perf_counter() - t0:.0f} s.")
    table = format_table(rows, COLUMNS)
    print("\n" + head + "\n\n" + table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(f"{head}\n\n{table}\n")
        with (out / "rows.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        plot(rows, out / "scaling.png", f"preset {args.preset}, {args.threads} thread(s), {cpu[:90]}")
        print(f"wrote {out / 'table.md'}, {out / 'rows.csv'}, {out / 'scaling.png'}")
    return rows


if __name__ == "__main__":
    main()
