"""Shared benchmark plumbing: timing quantiles, environment stamp, CSV rows, ceilings, tables.

Every benchmark script (kernels, train step, sampler) uses these so rows are comparable across runs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

CSV_COLUMNS = [
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "p50_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "tflops",
    "device",
    "torch",
    "triton",
    "git_sha",
    "date",
]
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def quantiles(times_ms: Sequence[float]) -> dict[str, float]:
    """p50/p20/p80 of a list of times (inclusive method, so 1 sample gives itself)."""
    if not times_ms:
        raise ValueError("quantiles() needs at least one time")
    if len(times_ms) == 1:
        t = float(times_ms[0])
        return {"p50": t, "p20": t, "p80": t}
    q = statistics.quantiles(times_ms, n=10, method="inclusive")  # q[1]=p20, q[7]=p80
    return {"p50": float(statistics.median(times_ms)), "p20": float(q[1]), "p80": float(q[7])}


def interleaved(fa: Callable[[], Any], fb: Callable[[], Any], reps: int, warmup: int = 1) -> tuple[dict, dict]:
    """Time two calls alternately (after `warmup` calls of each), so load drift on a shared machine
    biases both alike and their ratio stays meaningful: (quantiles of a, quantiles of b) in ms."""
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            out.append((time.perf_counter() - t0) * 1e3)
    return quantiles(ta), quantiles(tb)


def measure(
    fn: Callable[[], Any], warmup: int = 3, reps: int = 10, device: torch.device | str | None = None
) -> dict[str, float]:
    """Time `fn()` `reps` times after `warmup` calls; returns {"p50", "p20", "p80"} in ms.

    On CUDA each call is bracketed by CUDA events (device time, no host overhead in between
    calls hidden); elsewhere by `time.perf_counter` after a synchronise. `device` defaults to
    CUDA when it is available.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    is_cuda = torch.device(device).type == "cuda"
    for _ in range(max(0, warmup)):
        fn()
    _sync(device)
    times: list[float] = []
    if is_cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


# ----------------------------------------------------------------------------- environment
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def env_info(device: torch.device | str | None = None) -> dict[str, str]:
    """Device, library versions, git sha and how busy the machine is (timings depend on it)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        triton_version = "none"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "load_avg": load,
        "threads": str(torch.get_num_threads()),
    }


# ----------------------------------------------------------------------------- rows and CSV
def make_row(
    op: str,
    provider: str,
    mode: str,
    shape: str,
    dtype: torch.dtype | str,
    times: dict[str, float],
    env: dict[str, str],
    bytes_moved: float | None = None,
    flops: float | None = None,
) -> dict[str, Any]:
    """One CSV row; GB/s and TFLOP/s are derived from the median time."""
    p50 = times["p50"]
    gbps = bytes_moved / (p50 * 1e-3) / 1e9 if bytes_moved and p50 > 0 else float("nan")
    tflops = flops / (p50 * 1e-3) / 1e12 if flops and p50 > 0 else float("nan")
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "p50_ms": round(p50, 5),
        "p20_ms": round(times["p20"], 5),
        "p80_ms": round(times["p80"], 5),
        "gbps": round(gbps, 3),
        "tflops": round(tflops, 4),
        "device": env["device"],
        "torch": env["torch"],
        "triton": env["triton"],
        "git_sha": env["git_sha"],
        "date": env["date"],
    }


def append_rows(csv_path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Append rows to `csv_path` (created with a header when new); unknown keys are an error."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    for r in rows:
        extra = set(r) - set(CSV_COLUMNS)
        if extra:
            raise ValueError(f"row has columns {sorted(extra)} not in CSV_COLUMNS {CSV_COLUMNS}")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
    return path


def read_rows(csv_path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(csv_path).open(newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- providers
def providers_for(device: torch.device | str) -> list[str]:
    """Providers to benchmark: reference (eager), compiled (reference under torch.compile), triton on CUDA."""
    provs = ["reference", "compiled"]
    if torch.device(device).type == "cuda":
        provs.append("triton")
    return provs


# ----------------------------------------------------------------------------- ceilings
def measured_ceilings(
    device: torch.device | str, copy_mib: int | None = None, matmul_n: int | None = None
) -> dict[str, float]:
    """Achievable copy GB/s (read+write counted) and matmul TFLOP/s on this device, right now.

    CUDA: a 1 GiB device-to-device copy and an 8192² bf16 matmul. CPU: 64 MiB copy and a
    1024² fp32 matmul (small, because the machine is shared).
    """
    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    copy_mib = copy_mib or (1024 if is_cuda else 64)
    matmul_n = matmul_n or (8192 if is_cuda else 1024)
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), warmup=3, reps=10 if is_cuda else 5, device=dev)
    copy_gbps = 2 * src.numel() * 4 / (t["p50"] * 1e-3) / 1e9
    src = dst = None  # free the copy buffers before allocating the matmul operands
    mm_dtype = torch.bfloat16 if is_cuda else torch.float32
    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=mm_dtype)
    b = torch.randn(matmul_n, matmul_n, device=dev, dtype=mm_dtype)
    t = measure(lambda: a @ b, warmup=2, reps=10 if is_cuda else 3, device=dev)
    tflops = 2 * matmul_n**3 / (t["p50"] * 1e-3) / 1e12
    return {
        "copy_gbps": round(copy_gbps, 2),
        "matmul_tflops": round(tflops, 3),
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
    }


# ----------------------------------------------------------------------------- output
def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Markdown table of `rows` (columns default to the interesting subset of CSV_COLUMNS)."""
    if not rows:
        return "(no rows)"
    columns = list(
        columns
        or ["op", "provider", "mode", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "gbps", "tflops"]
    )
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    print(format_table(rows, columns))


def maybe_compile(fn: Callable, provider: str) -> Callable:
    """The callable a provider runs: torch.compile(fn) for "compiled", fn otherwise."""
    if provider == "compiled":
        # A fresh dynamo cache per setup: many shapes x modes of one function would otherwise hit
        # the recompile limit and silently time eager code.
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)
    return fn


# ----------------------------------------------------------------------------- op benchmark driver
def shape_str(shape: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def grad_targets(inputs: dict[str, Any]) -> list[torch.Tensor]:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def timed_callable(op: Callable[..., torch.Tensor], inputs: dict[str, Any], mode: str) -> Callable[[], Any]:
    """fn() for one mode: "fwd" runs op(**inputs); "bwd" replays the backward of one kept forward
    (retain_graph); "fwd+bwd" runs both. Inputs that require grad get gradients."""
    if mode == "fwd":
        return lambda: op(**inputs)
    params = grad_targets(inputs)
    if not params:
        raise ValueError("mode needs inputs that require grad; build them with requires_grad=True")
    out = op(**inputs)
    dy = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, params, dy, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(op(**inputs), params, dy)
    raise ValueError(f"mode {mode!r} unknown; allowed: fwd, bwd, fwd+bwd")


def run_op_benchmarks(
    op: str,
    setup: Callable[..., tuple[Callable[[], Any], float | None, float | None]],
    shapes: Sequence[dict[str, Any]],
    device: torch.device | str,
    dtype: torch.dtype,
    modes: Sequence[str] = ("fwd", "fwd+bwd"),
    providers: Sequence[str] | None = None,
    warmup: int = 3,
    reps: int = 10,
    env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time every (shape, mode, provider); `setup(provider, mode, device, dtype, **shape)` returns
    (fn, bytes_moved, flops). A provider that fails is logged and skipped, not fatal."""
    env = env or env_info(device)
    providers = list(providers or providers_for(device))
    rows = []
    for shape in shapes:
        for mode in modes:
            for prov in providers:
                try:
                    fn, nbytes, flops = setup(prov, mode, device, dtype, **shape)
                    times = measure(fn, warmup=warmup, reps=reps, device=device)
                except Exception as e:  # noqa: BLE001 - report and keep going
                    log(f"[{op}] {prov} {mode} {shape_str(shape)}: FAILED {type(e).__name__}: {e}")
                    continue
                rows.append(make_row(op, prov, mode, shape_str(shape), dtype, times, env, nbytes, flops))
    return rows


def op_main(op_module, argv: list[str] | None = None) -> list[dict]:
    """The command line every kernel benchmark shares: `python -m benchmarks.benchmark_<op>`.

    op_module exposes OP, MODES, setup(provider, mode, device, dtype, **shape) and
    gpu_shapes() / cpu_shapes() / quick_shapes()."""
    import argparse

    ap = argparse.ArgumentParser(description=op_module.__doc__)
    ap.add_argument("--csv", default=None, help="append rows here (default benchmarks/results/<device>.csv)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    ap.add_argument("--providers", default=None, help="comma list, default: all for this device")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = op_module
    shapes = m.quick_shapes() if args.quick else (m.gpu_shapes() if device == "cuda" else m.cpu_shapes())
    env = env_info(device)
    print(f"# {m.OP} on {env['device']} (load avg {env['load_avg']}, {env['threads']} threads)")
    providers = args.providers.split(",") if args.providers else None
    rows = run_op_benchmarks(m.OP, m.setup, shapes, device, dtype, m.MODES, providers, reps=args.reps, env=env)
    append_rows(args.csv or RESULTS_DIR / f"{device}.csv", rows)
    print_table(rows)
    return rows


def op_speed_test(op_module, benchmark, provider: str, mode: str) -> None:
    """The pytest-benchmark body every kernel benchmark shares (one shape, one provider)."""
    import pytest

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if provider not in providers_for(device):
        pytest.skip(f"{provider} needs CUDA")
    shape = op_module.gpu_shapes()[0] if device == "cuda" else op_module.quick_shapes()[0]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fn, _, _ = op_module.setup(provider, mode, device, dtype, **shape)
    benchmark(fn)
