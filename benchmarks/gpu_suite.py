"""One short run on one GPU: every kernel checked against its reference, benchmarked, and more.

    PYTHONPATH=. python3 -m benchmarks.gpu_suite --out OUT --budget-s 480     # from a bare checkout
    PYTHONPATH=. python3 -m benchmarks.gpu_suite --dry-run --out /tmp/plan    # the whole plan on CPU
    TRITON_INTERPRET=1 PYTHONPATH=. python3 -m benchmarks.gpu_suite --smoke   # kernels, interpreter

Needs torch and triton only (no install step, no deepspeed/diffusers/webdataset; docs/gpu.md).
The plan is a list of steps, each timed and in its own try/except (one failure is reported, not
fatal); a step whose estimate no longer fits in --budget-s is skipped, and the files written so far
stay valid. --out DIR receives:

  results.csv   benchmark rows (benchmarks.common.CSV_COLUMNS)     checks.csv  kernel vs fp64 errors
  summary.md    the short table, also printed last (< 4 K chars)   summary.json  the same as data
  suite.log     everything, tracebacks included (the console gets one line per step)

Steps, in order (docs/design.md §3 / docs/gpu.md):
1. ceilings: device-to-device copy GB/s and bf16 matmul TFLOP/s, measured in the same run;
2. correctness: each op in kernels/ (`<op>`, `<op>_reference`, `make_inputs`) against an fp64
   reference on the same rounded inputs, forward and every gradient, bf16/fp16/fp32, at the training
   tile sizes (adaln N = 65 536 rows: the BLOCK_M = 128 path) and the sampling sizes (no grad: the
   forward-only kernels); pass when the kernel's error is at most twice the reference's in that
   dtype (+ a small floor);
3. train step: DREAM-B (and tiny) samples/s and MFU (benchmarks/benchmark_train_step.run_gpu);
4. sampler: eager vs CUDA graphs at batch 1 and 32, K = 1, and SAD K = 5 (benchmark_sampler.run_gpu);
5. op benchmarks: benchmarks/benchmark_<op>.py (reference and every Triton variant the module lists in
   TRITON_PROVIDERS, e.g. triton / triton-baseline: before and after on the same GPU in the same run;
   then torch.compile if time is left);
6. attention backends through dream_fast.model.attention (flash-attn, SDPA, xformers, math).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dream_fast.kernels.error_rule import within_rule

from benchmarks.common import (
    CSV_COLUMNS,
    RESULTS_DIR,
    append_rows,
    env_info,
    make_row,
    maybe_compile,
    measure,
    measured_ceilings,
    providers_for,
    run_op_benchmarks,
    timed_callable,
)

# Correctness shapes per op: (label, make_inputs keywords, with gradients). Training: DREAM-B/H
# encoder/decoder rows (batch 64, 64 buffer + 256 tokens, 25% kept), head rows 64 x 256 x 4 (all
# masked, the largest head batch; > 4096 rows, so BLOCK_M = 128) and 4096 (BLOCK_M = 64). Sampling:
# forward only, 32 prompts x cfg 2 x 16 tokens a step and batch 1.
CHECK_SHAPES: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    "masked_gather": [
        ("train B", dict(B=64, L=256, C=16, D=768, S=64, K=64), True),
        ("train H", dict(B=64, L=256, C=16, D=1280, S=64, K=64), True),
        ("sample", dict(B=32, L=256, C=16, D=768, S=64, K=128), False),
    ],
    "decoder_fill": [
        ("train B", dict(B=64, L=256, D=768, S=64, K=64), True),
        ("train H", dict(B=64, L=256, D=1280, S=64, K=64), True),
        ("sample", dict(B=32, L=256, D=768, S=64, K=128), False),
    ],
    "adaln_block": [
        ("train N=65536", dict(N=64 * 256 * 4, W=1024), True),
        ("train N=4096", dict(N=4096, W=1024), True),
        ("sample N=1024", dict(N=32 * 2 * 16, W=1024), False),
        ("sample N=16", dict(N=16, W=1024), False),
    ],
    "guided_ddpm_step": [
        ("sample N=65536", dict(N=64 * 256 * 4, C=16), False),
        ("sample N=16", dict(N=16, C=16), False),
    ],
}
SMOKE_SHAPES: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    "masked_gather": [("train", dict(B=2, L=37, C=12, D=80, S=5, K=20), True),
                      ("sample", dict(B=2, L=37, C=12, D=80, S=5, K=20), False)],
    "decoder_fill": [("train", dict(B=2, L=37, D=80, S=5, K=20), True),
                     ("sample", dict(B=2, L=37, D=80, S=5, K=20), False)],
    "adaln_block": [("train", dict(N=24, W=32), True), ("sample", dict(N=5, W=32), False)],
    "guided_ddpm_step": [("sample", dict(N=40, C=4), False)],
}
# Relative floor of the 2x rule: |kernel - fp64| <= 2 |ref_dtype - fp64| + FLOOR * max(1, |fp64|max).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUMMARY_MAX_CHARS = 4000


# ----------------------------------------------------------------------------- logging
class Log:
    """Console gets short lines; suite.log gets everything (hook output, tracebacks)."""

    def __init__(self, path: Path | None):
        self.file = path.open("a") if path else None

    def __call__(self, msg: str, console: bool = True) -> None:
        if console:
            print(msg, flush=True)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()

    def detail(self, msg: str) -> None:
        self(msg, console=False)

    @contextlib.contextmanager
    def captured(self):
        """Send whatever a hook prints to the log file only."""
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                yield
            finally:
                if buf.getvalue():
                    self.detail(buf.getvalue().rstrip())


# ----------------------------------------------------------------------------- discovery
def discover_ops(log: Callable[[str], None] = print) -> dict[str, Any]:
    """name -> module for every op file in kernels/ (dispatch and private modules excluded)."""
    import dream_fast.kernels as pkg

    ops = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in ("dispatch", "error_rule"):
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
    with torch.set_grad_enabled(dy is not None):
        out = fn(**inputs)
    res = {"out": out.detach()}
    if dy is not None:
        names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad(out, [inputs[n] for n in names], dy.to(out.dtype), allow_unused=True)
        res.update({f"grad {n}": g for n, g in zip(names, grads) if g is not None})
    return res


def check_op(
    name: str, mod: Any, device: str, dtype: torch.dtype, shape: dict[str, Any], grad: bool = True, label: str = ""
) -> list[dict]:
    """Kernel vs fp64 reference on the same rounded inputs: one row per output / gradient."""
    base = dict(op=name, shape=label or ",".join(f"{k}={v}" for k, v in shape.items()),
                dtype=str(dtype).replace("torch.", ""))
    api = op_api(name, mod)
    if isinstance(api, str):
        return [dict(base, tensor="-", status=f"SKIP ({api})")]
    fn, ref, make_inputs = api
    kw = dict(shape)
    if _accepts(make_inputs, "requires_grad"):
        kw["requires_grad"] = grad
    low = make_inputs(device, dtype, **kw)
    differentiable = grad and any(isinstance(v, torch.Tensor) and v.requires_grad for v in low.values())
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
        row = dict(base, tensor=tname)
        if got is None or lo is None:
            rows.append({**row, "status": "FAIL (kernel gave no gradient)"})
            continue
        ok, err_k, err_r = within_rule(got, lo, want, FLOOR[dtype])
        rows.append({**row, "kernel_err": f"{err_k:.3e}", "ref_err": f"{err_r:.3e}", "status": "ok" if ok else "FAIL"})
    return rows


CHECK_COLUMNS = ["op", "shape", "dtype", "tensor", "kernel_err", "ref_err", "status"]


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


def bench_module(name: str) -> Any | None:
    """benchmarks/benchmark_<name>.py, or None when there is none (a module that exists but fails
    to import raises: its error is the step's)."""
    target = f"benchmarks.benchmark_{name}"
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name != target:
            raise
        return None


def triton_providers(name: str) -> tuple[str, ...]:
    """The Triton providers an op benchmark times: its module's TRITON_PROVIDERS (each kernel
    variant, benchmarks/kernel_variants.py; the default variant is "triton"), else ("triton",)."""
    bm = bench_module(name)
    provs = tuple(getattr(bm, "TRITON_PROVIDERS", None) or ("triton",))
    bad = [p for p in provs if not (p == "triton" or p.startswith("triton-"))]
    if bad:
        raise ValueError(f"benchmarks.benchmark_{name}.TRITON_PROVIDERS: {bad} are not triton / triton-<variant>")
    return provs


def op_bench_plan(name: str, mod: Any, tiny: bool, max_shapes: int):
    """(setup, shapes, modes) for one op: its benchmark module when present, else generic."""
    bm = bench_module(name)
    if bm is not None:
        shapes = bm.quick_shapes() if tiny else bm.gpu_shapes()[:max_shapes]
        return bm.setup, shapes, tuple(bm.MODES)
    if isinstance(op_api(name, mod), str):
        return None
    modes = ("fwd", "fwd+bwd") if _accepts(mod.make_inputs, "requires_grad") else ("fwd",)
    shapes = [SMOKE_SHAPES[name][0][1]] if tiny and name in SMOKE_SHAPES else [{}]
    return generic_setup(name, mod), shapes, modes


def bench_providers(mode: str, variants: tuple[str, ...], compiled: bool) -> list[str]:
    """Providers of one op-benchmark step: GPU and --smoke time the eager reference and every Triton
    variant in one step (so a variant's before/after ratio comes from one run on one device);
    --dry-run the reference only (no Triton on CPU without the interpreter)."""
    if compiled:
        return ["compiled"]
    if mode == "dry-run":
        return ["reference"]
    return ["reference", *variants]


# ----------------------------------------------------------------------------- attention
def bench_attention(device: str, env: dict, tiny: bool, reps: int, log: Callable[[str], None]) -> list[dict]:
    attn = importlib.import_module("dream_fast.model.attention")
    B, L, H, Dh = (2, 40, 2, 16) if tiny else (32, 320, 12, 64)
    dtype = torch.float32 if tiny else torch.bfloat16
    avail = attn.available_backends() if hasattr(attn, "available_backends") else {}
    rows = []
    for backend in ("flash", "sdpa", "xformers", "math"):
        if not avail.get(backend, backend in ("sdpa", "math")):
            log(f"[attention] {backend}: not installed", console=False)
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, L, H, Dh, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
        chosen = attn._choose(backend, q, False, q.shape[1]) if hasattr(attn, "_choose") else backend
        if chosen != backend:
            log(f"[attention] {backend}: not usable here (dispatch falls back to {chosen})", console=False)
            continue
        inputs = dict(q_BLHD=q, k_BSHD=k, v_BSHD=v)
        op = lambda backend=backend, **kw: attn.attention(**kw, backend=backend)  # noqa: E731
        fwd_flops = 4.0 * B * H * L * L * Dh
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):  # bwd ~ 2.5x fwd flops
            try:
                t = measure(timed_callable(op, inputs, mode), warmup=1 if tiny else 5, reps=reps, device=device)
            except Exception as e:  # noqa: BLE001
                log(f"[attention] {backend} {mode}: FAILED {type(e).__name__}: {e}")
                continue
            rows.append(make_row("attention", backend, mode, f"B={B},L={L},H={H},Dh={Dh}", dtype, t, env,
                                 bytes_moved=None, flops=fwd_flops * mult))
    return rows


# ----------------------------------------------------------------------------- hooks
def run_hook(module: str, device: str, budget_s: float, env: dict) -> list[dict]:
    mod = importlib.import_module(module)
    offer = dict(device=device, budget_s=budget_s, env=env)
    kw = {k: v for k, v in offer.items() if _accepts(mod.run_gpu, k)}
    rows = mod.run_gpu(**kw) or []
    return [{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows]


@contextlib.contextmanager
def reference_ops_on_cpu(ctx: Ctx):
    """--smoke: the whole-model hooks run the reference ops (the interpreter takes minutes there)."""
    if ctx.mode != "smoke":
        yield
        return
    old = os.environ.get("DREAM_KERNELS")
    os.environ["DREAM_KERNELS"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DREAM_KERNELS", None)
        else:
            os.environ["DREAM_KERNELS"] = old


def train_step_dry(device: str, env: dict) -> list[dict]:
    """The train-step benchmark's code on CPU at the tiny preset, batch 2, one rep (--dry-run, --smoke)."""
    bm = importlib.import_module("benchmarks.benchmark_train_step")
    rows = bm.bench(["tiny"], torch.device(device), 2, "fp32", 1, env, 1.0)
    return [{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows]


# ----------------------------------------------------------------------------- the plan
@dataclass
class Ctx:
    device: str
    mode: str  # "gpu" | "smoke" | "dry-run"
    env: dict[str, str]
    log: Log
    deadline: float
    reps: int
    max_shapes: int
    ceilings: dict[str, float] = field(default_factory=dict)

    @property
    def tiny(self) -> bool:
        return self.mode != "gpu"

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Step:
    section: str
    name: str
    est_s: float  # estimated seconds on one H100/H200 (the budget gate)
    run: Callable[[Ctx], list[dict]]
    kind: str = "bench"  # "bench" rows go to results.csv, "check" rows to checks.csv
    status: str = "pending"
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)


def build_plan(ops: dict[str, Any], mode: str, dtypes: list[str], max_shapes: int) -> list[Step]:
    tiny = mode != "gpu"
    plan: list[Step] = []

    def ceilings(ctx: Ctx) -> list[dict]:
        kw = dict(copy_mib=8, matmul_n=128) if ctx.tiny else {}
        ctx.ceilings = measured_ceilings(ctx.device, **kw)
        return [dict(ctx.ceilings)]

    plan.append(Step("ceilings", "copy GB/s + matmul TFLOP/s", 10, ceilings, kind="meta"))

    shapes = SMOKE_SHAPES if tiny else CHECK_SHAPES
    for dt in dtypes:
        for name, mod in ops.items():
            for label, shape, grad in shapes.get(name, [("default", {}, True)]):
                def run(ctx, name=name, mod=mod, dt=dt, shape=shape, grad=grad, label=label):
                    return check_op(name, mod, ctx.device, DTYPES[dt], shape, grad=grad, label=label)

                plan.append(Step("correctness", f"{name} {label} {dt}", 4 if grad else 2, run, kind="check"))

    def train_step(ctx: Ctx) -> list[dict]:
        with ctx.log.captured(), reference_ops_on_cpu(ctx):
            if ctx.mode != "gpu":  # the hook's GPU sizes (batch 256, 20 reps) are minutes on a CPU
                return train_step_dry(ctx.device, ctx.env)
            return run_hook("benchmarks.benchmark_train_step", ctx.device, max(30.0, ctx.left() - 200), ctx.env)

    plan.append(Step("train step", "DREAM-B + tiny, bf16", 60, train_step))

    def sampler(ctx: Ctx) -> list[dict]:
        with ctx.log.captured(), reference_ops_on_cpu(ctx):
            # on CPU a 1 s budget runs the hook's first configuration only
            budget = 1.0 if ctx.mode != "gpu" else max(30.0, min(120.0, ctx.left() - 120))
            return run_hook("benchmarks.benchmark_sampler", ctx.device, budget, ctx.env)

    plan.append(Step("sampler", "eager vs CUDA graphs, B=1/32, K=1, SAD K=5", 60, sampler))

    bench_dtype = "fp32" if tiny else "bf16"
    for compiled in (False, True):
        for name, mod in ops.items():
            variants = triton_providers(name)

            def bench(ctx, name=name, mod=mod, compiled=compiled, variants=variants):
                spec = op_bench_plan(name, mod, ctx.tiny, ctx.max_shapes)
                if spec is None:
                    ctx.log(f"[bench] {name}: no benchmark module and incomplete API, skipped")
                    return []
                setup, shapes_, modes = spec
                providers = bench_providers(ctx.mode, variants, compiled)
                if ctx.mode == "gpu" and "triton" not in providers_for(ctx.device):
                    providers = [p for p in providers if not p.startswith("triton")]
                with ctx.log.captured():
                    return run_op_benchmarks(name, setup, shapes_, ctx.device, DTYPES[bench_dtype], modes, providers,
                                             warmup=1 if ctx.tiny else 5, reps=ctx.reps, env=ctx.env,
                                             log=ctx.log.detail)

            if compiled and mode != "gpu":
                continue  # compiling on 2 shared CPU cores is not a plan check
            label = "torch.compile" if compiled else "reference vs " + " / ".join(variants)
            # ~10 s per provider on one H200 (2 shapes x 2 modes x 25 timed calls, plus the compile)
            plan.append(Step("op benchmarks", f"{name} {label}", 60 if compiled else 5 + 10 * len(variants), bench))

    def attention(ctx: Ctx) -> list[dict]:
        return bench_attention(ctx.device, ctx.env, ctx.tiny, ctx.reps, ctx.log)

    # attention before the torch.compile benchmarks: cheap and more telling
    first_compiled = next((i for i, s in enumerate(plan) if "torch.compile" in s.name), len(plan))
    plan.insert(first_compiled, Step("attention", "flash / sdpa / xformers / math, bf16", 15, attention))
    return plan


def run_plan(plan: list[Step], ctx: Ctx, out: Path | None) -> None:
    for i, step in enumerate(plan, 1):
        if ctx.left() < step.est_s:
            step.status = "skipped (budget)"
            ctx.log.detail(f"[{i}/{len(plan)}] {step.section}: {step.name}: skipped, {ctx.left():.0f}s left")
            continue
        t0 = time.monotonic()
        try:
            step.rows = step.run(ctx) or []
            bad = [r for r in step.rows if str(r.get("status", "ok")).startswith(("FAIL", "ERROR"))]
            step.status = "FAIL" if bad else "ok"
        except Exception as e:  # noqa: BLE001 - the suite reports and moves on
            ctx.log.detail(traceback.format_exc())
            step.status = f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            if step.kind == "check":
                step.rows = [dict(op=step.name.split()[0], shape=step.name, dtype="", tensor="-", status=step.status)]
        step.seconds = time.monotonic() - t0
        ctx.log(f"[{i}/{len(plan)}] {step.section}: {step.name}: {step.status} ({step.seconds:.1f}s)",
                console=step.status != "ok" or step.section != "correctness")
        if out is not None:
            write_rows(out, step)
        if ctx.mode == "gpu":
            torch.cuda.empty_cache()


def write_rows(out: Path, step: Step) -> None:
    if step.kind == "bench" and step.rows:
        append_rows(out / "results.csv", step.rows)
    elif step.kind == "check" and step.rows:
        path = out / "checks.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CHECK_COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(step.rows)


# ----------------------------------------------------------------------------- summary
def _f(x: Any, nd: int = 2) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "-" if math.isnan(v) else f"{v:.{nd}f}"


def summarize(plan: list[Step], ctx: Ctx, total_s: float, budget_s: float) -> tuple[str, dict]:
    env, ceil = ctx.env, ctx.ceilings
    lines = [
        f"# GPU suite ({ctx.mode}) on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
        f"git {env['git_sha']}, {env['date']}",
        f"total {total_s:.0f}s of {budget_s:.0f}s budget; ceilings: copy {_f(ceil.get('copy_gbps'), 0)} GB/s, "
        f"{ceil.get('matmul_dtype', 'bf16')} matmul {_f(ceil.get('matmul_tflops'), 1)} TFLOP/s",
    ]
    checks = [r for s in plan if s.kind == "check" for r in s.rows]
    lines.append("")
    lines.append("## correctness (kernel vs fp64; ok when err <= 2x the reference's in that dtype)")
    by_op: dict[str, list[dict]] = {}
    for r in checks:
        by_op.setdefault(r["op"], []).append(r)
    for op, rs in by_op.items():
        ok = sum(r["status"] == "ok" for r in rs)
        ratios = [float(r["kernel_err"]) / max(float(r["ref_err"]), 1e-30) for r in rs if r.get("kernel_err")]
        worst = f", worst kernel/ref err {max(ratios):.2f}x" if ratios else ""
        lines.append(f"- {op}: {ok}/{len(rs)} ok{worst}")
    bad = [r for r in checks if r["status"] != "ok" and not r["status"].startswith("SKIP")]
    for r in bad[:6]:
        lines.append(f"  - FAIL {r['op']} [{r['shape']}, {r['dtype']}] {r['tensor']}: {r['status']} "
                     f"(kernel {r.get('kernel_err', '-')}, ref {r.get('ref_err', '-')})")
    if len(bad) > 6:
        lines.append(f"  - ... {len(bad) - 6} more in checks.csv")

    bench = [r for s in plan if s.kind == "bench" for r in s.rows]
    kern = [r for r in bench if r["op"] not in ("train_step", "sampler", "attention")]
    if kern:
        lines += ["", "## kernels (p50 ms; speed-up vs eager reference; % of measured copy GB/s; "
                      "(triton Nx): the default variant's speed-up over that variant)"]
        groups: dict[tuple, dict[str, dict]] = {}
        for r in kern:
            groups.setdefault((r["op"], r["shape"], r["mode"]), {})[r["provider"]] = r
        for (op, shape, mode), provs in list(groups.items())[:14]:
            ref, default = provs.get("reference"), provs.get("triton")
            parts = []
            for p, r in provs.items():
                sp = f" {float(ref['p50_ms']) / float(r['p50_ms']):.2f}x" if ref and p != "reference" else ""
                if default and p.startswith("triton-"):  # a variant: the default's speed-up over it
                    sp += f" (triton {float(r['p50_ms']) / float(default['p50_ms']):.2f}x)"
                pct = ""
                if ceil.get("copy_gbps") and r.get("gbps") not in ("", None) and not math.isnan(float(r["gbps"])):
                    pct = f" {100 * float(r['gbps']) / ceil['copy_gbps']:.0f}%"
                parts.append(f"{p} {_f(r['p50_ms'], 3)}{sp}{pct}")
            lines.append(f"- {op} {mode} [{shape}]: " + ", ".join(parts))
    for title, op in (("train step", "train_step"), ("sampler (p50 ms per call)", "sampler"),
                      ("attention (p50 ms)", "attention")):
        rs = [r for r in bench if r["op"] == op]
        if not rs:
            continue
        lines += ["", f"## {title}"]
        for r in rs[:8]:
            extra = ""
            if op == "train_step":
                extra = f", {_f(r.get('tflops'), 1)} TFLOP/s" + (
                    f" = MFU {100 * float(r['tflops']) / ceil['matmul_tflops']:.0f}% of measured matmul"
                    if ceil.get("matmul_tflops") and r.get("tflops") not in ("", None) else ""
                )
            lines.append(f"- {r['provider']} {r['mode']} [{r['shape']}] {r['dtype']}: {_f(r['p50_ms'], 2)} ms{extra}")
    skipped = [s for s in plan if s.status.startswith("skipped")]
    errors = [s for s in plan if s.status.startswith(("ERROR", "FAIL"))]
    lines += ["", f"steps: {sum(s.status == 'ok' for s in plan)} ok, {len(errors)} failed, {len(skipped)} skipped "
                  f"(budget), of {len(plan)}"]
    for s in errors[:5]:
        lines.append(f"- {s.section} / {s.name}: {s.status[:140]}")
    text = "\n".join(lines)
    if len(text) > SUMMARY_MAX_CHARS:
        text = text[: SUMMARY_MAX_CHARS - 40].rsplit("\n", 1)[0] + "\n... (cut: see summary.json, results.csv)"
    data = dict(
        mode=ctx.mode,
        env=env,
        ceilings=ceil,
        total_s=round(total_s, 1),
        budget_s=budget_s,
        checks=dict(total=len(checks), ok=sum(r["status"] == "ok" for r in checks), failed=bad),
        steps=[dict(section=s.section, name=s.name, status=s.status, seconds=round(s.seconds, 2), rows=len(s.rows))
               for s in plan],
        results=bench,
    )
    return text, data


# ----------------------------------------------------------------------------- main
def default_out(env: dict[str, str]) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    safe_dev = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-")
    return RESULTS_DIR / f"gpu_{stamp}_{safe_dev}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="the whole plan on CPU at tiny sizes, reference ops only")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, kernels under TRITON_INTERPRET=1")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget; later steps are skipped")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/gpu_<date>_<device>/)")
    ap.add_argument("--dtypes", default=None,
                    help="correctness dtypes, comma list (default bf16,fp16,fp32; --smoke: fp32,fp16, since the "
                         "CPU interpreter has no bf16 dot)")
    ap.add_argument("--max-shapes", type=int, default=2, help="benchmark shapes per op")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    start = time.monotonic()
    run_mode = "dry-run" if args.dry_run else "smoke" if args.smoke else "gpu"
    if run_mode == "gpu" and not torch.cuda.is_available():
        print("no CUDA device: run --dry-run (the plan on CPU) or TRITON_INTERPRET=1 ... --smoke", flush=True)
        return 2
    device = "cuda" if run_mode == "gpu" else "cpu"
    if run_mode == "smoke" and os.environ.get("TRITON_INTERPRET") == "1":
        os.environ["DREAM_KERNELS"] = "triton"  # the public ops dispatch to the interpreter
    elif run_mode == "gpu":
        os.environ.pop("DREAM_KERNELS", None)  # CUDA tensors -> Triton through the normal dispatch
    else:
        os.environ["DREAM_KERNELS"] = "reference"  # dry run: no Triton, no CUDA
    env = env_info(device)
    out = Path(args.out) if args.out else default_out(env)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.csv", "checks.csv", "summary.md", "summary.json", "suite.log"):
        (out / name).unlink(missing_ok=True)
    log = Log(out / "suite.log")
    if args.dtypes is None:
        args.dtypes = "fp32,fp16" if run_mode == "smoke" else "bf16,fp16,fp32"
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        ap.error(f"--dtypes: unknown {unknown}; allowed: {list(DTYPES)}")
    ops = discover_ops(log)
    log(f"# GPU suite ({run_mode}) on {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"git {env['git_sha']} | load {env['load_avg']} | out {out}")
    log("ops: " + ", ".join(f"{n} ({'ok' if not isinstance(op_api(n, m), str) else op_api(n, m)})"
                            for n, m in ops.items()))
    plan = build_plan(ops, run_mode, args.dtypes.split(","), args.max_shapes)
    ctx = Ctx(device, run_mode, env, log, start + args.budget_s, 2 if run_mode != "gpu" else args.reps,
              args.max_shapes)

    def _term(signum, frame):  # a runner's timeout: stop cleanly, keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, _term)
    interrupted = ""
    try:
        run_plan(plan, ctx, out)
    except KeyboardInterrupt as e:
        interrupted = f"interrupted ({e or 'Ctrl-C'}): the files hold the steps before it"
        log(interrupted)
    finally:
        signal.signal(signal.SIGTERM, old)
        text, data = summarize(plan, ctx, time.monotonic() - start, args.budget_s)
        if interrupted:
            text += f"\n{interrupted}"
        (out / "summary.md").write_text(text + "\n")
        (out / "summary.json").write_text(json.dumps(data, indent=1, default=str))
        log.detail(text)
        print("\n" + text + f"\nfiles: {out}/", flush=True)
    bad = [s for s in plan if s.status.startswith(("ERROR", "FAIL"))]
    return 1 if bad or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
