"""One command for a CUDA machine: every kernel checked against its reference, benchmarked, and more.

`python -m benchmarks.gpu_suite` (< 8 min on H100/H200) writes benchmarks/results/gpu_<date>_<device>.csv
and prints one markdown table last; `TRITON_INTERPRET=1 python -m benchmarks.gpu_suite --smoke`
exercises the same code paths on CPU at tiny sizes.

Sections (each in try/except, so one failure is reported, not fatal):
1. measured ceilings: device-to-device copy GB/s, bf16 matmul TFLOP/s;
2. correctness: each op module in kernels/ exposing `<name>`, `<name>_reference` and
   `make_inputs(device, dtype, **shape)`: kernel vs an fp64 reference on the same (rounded) inputs,
   forward and every gradient, in bf16/fp16/fp32; pass when the kernel's error is at most twice the
   error of the reference run in the same dtype (+ a small floor);
3. op benchmarks: `benchmarks/benchmark_<name>.py` (OP, MODES, gpu_shapes(), setup()) when present,
   else a generic setup from make_inputs; providers reference / compiled / triton;
4. attention backends through `dream_fast.model.attention` (flash-attn, SDPA, xformers, math);
5. hooks: `benchmarks/benchmark_train_step.py:run_gpu(...)`, `benchmarks/benchmark_sampler.py:run_gpu(...)`,
   called with whichever of (device, budget_s, env) they accept and returning CSV rows.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import inspect
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    CSV_COLUMNS,
    RESULTS_DIR,
    append_rows,
    env_info,
    format_table,
    make_row,
    maybe_compile,
    measure,
    measured_ceilings,
    providers_for,
    run_op_benchmarks,
    timed_callable,
)

# Shapes for the correctness section (moderate: the fp64 reference runs too). Ops not listed use
# their make_inputs defaults.
CHECK_SHAPES: dict[str, dict[str, Any]] = {
    "masked_gather": dict(B=8, L=256, C=16, D=768, S=64, K=96),
    "decoder_fill": dict(B=8, L=256, D=768, S=64, K=96),
    "adaln_block": dict(N=4096, W=1024),
    "guided_ddpm_step": dict(N=65536, C=16),
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "masked_gather": dict(B=2, L=37, C=12, D=80, S=5, K=20),
    "decoder_fill": dict(B=2, L=37, D=80, S=5, K=20),
    "adaln_block": dict(N=24, W=32),
    "guided_ddpm_step": dict(N=40, C=4),
}
# Relative floor of the 2x rule: |kernel - fp64| <= 2 |ref_dtype - fp64| + FLOOR * max(1, |fp64|max).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- discovery
def discover_ops() -> dict[str, Any]:
    """name -> module for every op file in kernels/ (dispatch and private modules excluded)."""
    import dream_fast.kernels as pkg

    ops = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "dispatch":
            continue
        try:
            ops[info.name] = importlib.import_module(f"dream_fast.kernels.{info.name}")
        except Exception as e:  # noqa: BLE001
            log(f"[discover] dream_fast.kernels.{info.name}: import failed: {type(e).__name__}: {e}")
    return ops


def op_api(name: str, mod: Any) -> tuple[Any, Any, Any] | str:
    """(public fn, reference, make_inputs) or a string saying what is missing."""
    missing = [a for a in (name, f"{name}_reference", "make_inputs") if not hasattr(mod, a)]
    if missing:
        return f"missing {', '.join(missing)}"
    return getattr(mod, name), getattr(mod, f"{name}_reference"), mod.make_inputs


def _accepts(fn: Any, param: str) -> bool:
    try:
        return param in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- correctness
def _clone(inputs: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Fresh leaves (grads separate); floating tensors cast to `dtype` when given."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            t = v.detach().to(dtype or v.dtype).clone()
            out[k] = t.requires_grad_(v.requires_grad)
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
        else:
            out[k] = v
    return out


def _fwd_bwd(fn: Any, inputs: dict[str, Any], dy: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = fn(**inputs)
    res = {"out": out.detach()}
    if dy is not None:
        names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad(out, [inputs[n] for n in names], dy.to(out.dtype), allow_unused=True)
        res.update({f"grad {n}": g for n, g in zip(names, grads) if g is not None})
    return res


def check_op(name: str, mod: Any, device: str, dtype: torch.dtype, shape: dict[str, Any]) -> list[dict]:
    api = op_api(name, mod)
    if isinstance(api, str):
        return [dict(op=name, dtype=str(dtype), tensor="-", status=f"SKIP ({api})")]
    fn, ref, make_inputs = api
    kw = dict(shape)
    if _accepts(make_inputs, "requires_grad"):
        kw["requires_grad"] = True
    low = make_inputs(device, dtype, **kw)
    differentiable = any(isinstance(v, torch.Tensor) and v.requires_grad for v in low.values())
    dy = None
    if differentiable:
        with torch.no_grad():
            out_shape = ref(**low).shape
        dy = torch.randn(out_shape, device=device).to(dtype).double()
    exact = _fwd_bwd(ref, _clone(low, torch.float64), dy)  # fp64 on the already-rounded inputs
    ref_lo = _fwd_bwd(ref, _clone(low), dy)
    kern = _fwd_bwd(fn, _clone(low), dy)
    rows = []
    for tname, want in exact.items():
        got, lo = kern.get(tname), ref_lo.get(tname)
        row = dict(op=name, dtype=str(dtype).replace("torch.", ""), tensor=tname)
        if got is None or lo is None:
            rows.append({**row, "status": "FAIL (kernel gave no gradient)"})
            continue
        err_k = (got.double() - want).abs().max().item() if want.numel() else 0.0
        err_r = (lo.double() - want).abs().max().item() if want.numel() else 0.0
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        ok = err_k <= 2 * err_r + FLOOR[dtype] * scale and not got.isnan().any().item()
        rows.append({**row, "kernel_err": f"{err_k:.3e}", "ref_err": f"{err_r:.3e}", "status": "ok" if ok else "FAIL"})
    return rows


# ----------------------------------------------------------------------------- op benchmarks
def generic_setup(name: str, mod: Any):
    """setup(provider, mode, device, dtype, **shape) built from make_inputs, for ops without a
    benchmarks/benchmark_<name>.py. Bytes = all tensor inputs + the output (a lower bound)."""
    fn, ref, make_inputs = op_api(name, mod)

    def setup(provider: str, mode: str, device: str, dtype: torch.dtype, **shape):
        kw = dict(shape)
        if mode != "fwd":
            kw["requires_grad"] = True
        inputs = make_inputs(device, dtype, **kw)
        op = fn if provider == "triton" else maybe_compile(ref, provider)
        with torch.no_grad():
            out = ref(**inputs)
        nbytes = sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))
        nbytes += out.numel() * out.element_size()
        if mode == "fwd+bwd":
            nbytes *= 2
        return timed_callable(op, inputs, mode), nbytes, None

    return setup


def bench_ops(
    ops: dict[str, Any],
    device: str,
    dtype: torch.dtype,
    env: dict,
    smoke: bool,
    deadline: float,
    max_shapes: int,
    reps: int,
) -> list[dict]:
    rows: list[dict] = []
    for name, mod in ops.items():
        if time.monotonic() > deadline:
            log(f"[bench] {name}: skipped, time budget spent")
            continue
        try:
            bm = importlib.import_module(f"benchmarks.benchmark_{name}")
            setup, modes = bm.setup, tuple(bm.MODES)
            shapes = bm.quick_shapes() if smoke else bm.gpu_shapes()[:max_shapes]
        except ModuleNotFoundError:
            if isinstance(op_api(name, mod), str):
                log(f"[bench] {name}: no benchmark module and incomplete API, skipped")
                continue
            setup = generic_setup(name, mod)
            modes = ("fwd", "fwd+bwd") if _accepts(mod.make_inputs, "requires_grad") else ("fwd",)
            shapes = [SMOKE_SHAPES.get(name, {})] if smoke else [{}]
        providers = providers_for(device)
        if smoke and os.environ.get("TRITON_INTERPRET") == "1":
            providers = ["reference", "triton"]  # compiling on 2 shared cores is not a smoke test
        if time.monotonic() > deadline - 90 and "compiled" in providers:
            providers.remove("compiled")  # compile time is the expensive part; keep the rest
            log(f"[bench] {name}: 'compiled' dropped to stay within the time budget")
        t0 = time.monotonic()
        rows += run_op_benchmarks(
            name,
            setup,
            shapes,
            device,
            dtype,
            modes,
            providers,
            warmup=1 if smoke else 5,
            reps=reps,
            env=env,
            log=log,
        )
        log(f"[bench] {name}: {len(shapes)} shape(s) x {modes} x {providers} in {time.monotonic() - t0:.1f}s")
    return rows


# ----------------------------------------------------------------------------- attention
def bench_attention(device: str, env: dict, smoke: bool, reps: int) -> list[dict]:
    try:
        attn = importlib.import_module("dream_fast.model.attention")
    except ModuleNotFoundError:
        log("[attention] dream_fast.model.attention not available")
        return []
    B, L, H, Dh = (2, 40, 2, 16) if smoke else (32, 320, 12, 64)
    dtype = torch.float32 if smoke else torch.bfloat16
    avail = attn.available_backends() if hasattr(attn, "available_backends") else {}
    rows = []
    for backend in ("flash", "sdpa", "xformers", "math"):
        if not avail.get(backend, backend in ("sdpa", "math")):
            log(f"[attention] {backend}: not installed")
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, L, H, Dh, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
        chosen = attn._choose(backend, q, False, q.shape[1]) if hasattr(attn, "_choose") else backend
        if chosen != backend:
            log(f"[attention] {backend}: not usable here (dispatch falls back to {chosen})")
            continue
        inputs = dict(q_BLHD=q, k_BSHD=k, v_BSHD=v)
        op = lambda backend=backend, **kw: attn.attention(**kw, backend=backend)  # noqa: E731
        fwd_flops = 4.0 * B * H * L * L * Dh
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):  # bwd ~ 2.5x fwd flops
            try:
                t = measure(timed_callable(op, inputs, mode), warmup=1 if smoke else 5, reps=reps, device=device)
            except Exception as e:  # noqa: BLE001
                log(f"[attention] {backend} {mode}: FAILED {type(e).__name__}: {e}")
                continue
            rows.append(
                make_row(
                    "attention",
                    backend,
                    mode,
                    f"B={B},L={L},H={H},Dh={Dh}",
                    dtype,
                    t,
                    env,
                    bytes_moved=None,
                    flops=fwd_flops * mult,
                )
            )
    return rows


# ----------------------------------------------------------------------------- hooks
def run_hook(module: str, device: str, budget_s: float, env: dict) -> list[dict]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        log(f"[{module}] not available ({e})")
        return []
    if not hasattr(mod, "run_gpu"):
        log(f"[{module}] not available (no run_gpu)")
        return []
    offer = dict(device=device, budget_s=budget_s, env=env)
    kw = {k: v for k, v in offer.items() if _accepts(mod.run_gpu, k)}
    rows = mod.run_gpu(**kw) or []
    return [{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows]


# ----------------------------------------------------------------------------- main
def _section(name: str, failures: list[str], fn, *args, **kwargs):
    t0 = time.monotonic()
    log(f"\n## {name}")
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the suite reports and moves on
        traceback.print_exc()
        failures.append(f"{name}: {type(e).__name__}: {e}")
        return None
    finally:
        log(f"({name}: {time.monotonic() - t0:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (use TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="soft wall-clock budget (default 7 min)")
    ap.add_argument("--max-shapes", type=int, default=2, help="benchmark shapes per op")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/gpu_<date>_<device>.csv)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    ops = discover_ops()
    log(
        "ops: "
        + ", ".join(f"{n} ({'ok' if not isinstance(op_api(n, m), str) else op_api(n, m)})" for n, m in ops.items())
    )
    smoke = args.smoke
    if not torch.cuda.is_available() and not smoke:
        log("no CUDA: nothing to do (CPU check of this script: TRITON_INTERPRET=1 ... --smoke)")
        return 0
    device = "cpu" if smoke else "cuda"
    if smoke and os.environ.get("TRITON_INTERPRET") == "1":
        os.environ["DREAM_KERNELS"] = "triton"  # the public ops dispatch to the interpreter
    else:
        os.environ.pop("DREAM_KERNELS", None)  # CUDA tensors -> Triton through the normal dispatch
    env = env_info(device)
    log(
        f"# GPU suite on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"git {env['git_sha']} | load {env['load_avg']}"
    )
    failures: list[str] = []
    reps = 2 if smoke else args.reps

    ceil = (
        _section(
            "ceilings",
            failures,
            measured_ceilings,
            device,
            **(dict(copy_mib=8, matmul_n=128) if smoke else {}),
        )
        or {}
    )
    log(f"ceilings: {ceil}")

    def checks() -> list[dict]:
        out = []
        dtypes = [torch.float32, torch.float16] if smoke else [torch.bfloat16, torch.float16, torch.float32]
        for name, mod in ops.items():
            for dt in dtypes:
                shape = SMOKE_SHAPES.get(name, {}) if smoke else CHECK_SHAPES.get(name, {})
                try:
                    out += check_op(name, mod, device, dt, shape)
                except Exception as e:  # noqa: BLE001
                    out.append(dict(op=name, dtype=str(dt), tensor="-", status=f"ERROR {type(e).__name__}: {e}"))
        return out

    check_rows = _section("correctness", failures, checks) or []
    log(format_table(check_rows, ["op", "dtype", "tensor", "kernel_err", "ref_err", "status"]))
    n_bad = sum(1 for r in check_rows if not r["status"].startswith(("ok", "SKIP")))

    bench_dtype = torch.float32 if smoke else torch.bfloat16
    rows: list[dict] = []
    rows += (
        _section(
            "op benchmarks",
            failures,
            bench_ops,
            ops,
            device,
            bench_dtype,
            env,
            smoke,
            deadline,
            args.max_shapes,
            reps,
        )
        or []
    )
    rows += _section("attention backends", failures, bench_attention, device, env, smoke, reps) or []
    for hook in ("benchmarks.benchmark_train_step", "benchmarks.benchmark_sampler"):
        left = max(30.0, deadline - time.monotonic())
        rows += _section(hook, failures, run_hook, hook, device, left, env) or []

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    safe_dev = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-")
    out = Path(args.out) if args.out else RESULTS_DIR / f"gpu_{stamp}_{safe_dev}.csv"
    if rows:
        append_rows(out, rows)
        if check_rows:
            with out.with_name(out.stem + "_checks.csv").open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["op", "dtype", "tensor", "kernel_err", "ref_err", "status"])
                w.writeheader()
                w.writerows(check_rows)
        log(f"\nwrote {out}")
    log(
        f"\nchecks: {len(check_rows) - n_bad}/{len(check_rows)} ok; section failures: {failures or 'none'}; "
        f"total {time.monotonic() - start:.0f}s"
    )
    for r in rows:  # fraction of the measured ceilings, for the final table
        gb, tf = (float(r.get(c, "nan") if r.get(c, "") != "" else "nan") for c in ("gbps", "tflops"))
        r["%copy"] = f"{100 * gb / ceil['copy_gbps']:.0f}%" if ceil and gb == gb else ""
        r["%matmul"] = f"{100 * tf / ceil['matmul_tflops']:.0f}%" if ceil and tf == tf else ""
    log("\n" + format_table(rows, [*CSV_COLUMNS[: CSV_COLUMNS.index("tflops") + 1], "%copy", "%matmul"]))
    return 1 if n_bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
