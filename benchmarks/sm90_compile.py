"""Every Triton kernel compiled for sm_90 (H100/H200) on a machine with no GPU, with its resources.

A stand-in Triton driver (`triton.runtime.driver.set_active`) reports one sm_90 device (227 KiB of
shared memory per block, 65 536 registers per SM, 132 SMs) and launches nothing. The project's own
ops then run on `meta` tensors (shapes, no data) with the Triton path forced: their launchers pick
block sizes and grids exactly as on a GPU, Triton binds and specialises the arguments, compiles to
PTX and a cubin with its bundled ptxas, and checks the shared memory against the device limit.
Every op runs in each of its variants (the `variant=` its launcher takes, and masked_gather's
deterministic backward), since each is a different set of constexprs and so a different cubin.
Registers, stack and local memory (spills) are read from the cubin with the bundled `cuobjdump
--dump-resource-usage`. Each launch is checked (docs/gpu.md):

  * shared memory <= 227 KiB (Triton's own check raises OutOfResources beyond it);
  * registers x threads <= 65 536 (one block must fit the SM's register file);
  * no spills (stack/local bytes) in bf16/fp16; fp32 spills are reported, not failed;
  * int64 addressing where a tensor has >= 2^31 elements: every pointer into such a tensor must be
    offset by an i64 value somewhere on its way from the kernel argument (read from the TTIR).

`python -m benchmarks.sm90_compile [--quick] [--sizes B,H,G] [--out CSV]` prints the table and writes
benchmarks/results/2026-12-03_sm90-resources_cpu-compile/triton<version>.csv; tests/test_sm90_compile.py
runs the quick set.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SM90_TABLES = "2026-12-03_sm90-resources_cpu-compile"  # the committed tables, one CSV per triton version

# H100/H200 (sm_90): opt-in shared memory per block, registers per SM (and per block), SMs.
SM90 = dict(max_shared_mem=227 * 1024, max_num_regs=65536, multiprocessor_count=132, warpSize=32)
INT32_LIMIT = 2**31

# docs/design.md §1.10 sizes: width, diffusion head width (1024 for all), 256 image tokens + a 64-token buffer,
# token channels 16 (4 VAE channels x 2x2 patch), batch 64 per GPU, diffusion_batch_mul 4.
SIZES: dict[str, dict[str, int]] = {
    "B": dict(D=768, W=1024),
    "H": dict(D=1280, W=1024),
    "G": dict(D=1664, W=1024),
}
L_TOKENS, BUFFER, TOKEN_C, BATCH, DIFF_MUL = 256, 64, 16, 64, 4
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- the stand-in driver
@dataclass
class Launch:
    """One kernel launch seen by the stand-in driver."""

    kernel: str
    case: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared: int
    regs: int
    stack: int
    local: int
    big_args: dict[str, int] = field(default_factory=dict)  # argument name -> elements (>= 2^31)
    int32_only_args: list[str] = field(default_factory=list)  # big args reached by i32 offsets only

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    @property
    def spill_bytes(self) -> int:
        return self.stack + self.local


def cuobjdump_path() -> str:
    import triton

    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cand.is_file():
        return str(cand)
    found = shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError(f"cuobjdump: not in triton's package ({cand}) nor on PATH")
    return found


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of the one function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = _RES_RE.search(out)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    regs, stack, shared, local = (int(g) for g in m.groups())
    return dict(regs=regs, stack=stack, shared_static=shared, local=local)


class _Function:
    """What `load_binary` returns as the CUfunction: the cubin's resources."""

    def __init__(self, name: str, res: dict[str, int]):
        self.name, self.res = name, res


class _Utils:
    def __init__(self, props: dict[str, int]):
        self.props = props

    def get_device_properties(self, device):
        return dict(self.props)

    def load_binary(self, name, kernel, shared, device):
        res = cubin_resources(kernel)
        # (module, function, n_regs, n_spills, n_max_threads) as the CUDA driver's wrapper returns them
        return None, _Function(name, res), res["regs"], (res["stack"] + res["local"]) // 4, 1024

    def unload_module(self, module):
        return None


class StandInDriver:
    """A Triton driver for one sm_90 device whose launches record themselves and run nothing."""

    def __init__(self, capability: int = 90, props: dict[str, int] | None = None):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.utils = _Utils(props or SM90)
        self.launches: list[Launch] = []
        self.case = ""
        driver = self

        class _Launcher:
            def __init__(self, src, metadata):
                self.fn = src.fn
                self.metadata = metadata

            def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
                driver._record(self.fn, self.metadata, (gx, gy, gz), function, args)

        self.launcher_cls = _Launcher

    # DriverBase / GPUDriver surface used by triton.runtime.jit and triton.compiler
    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        return None

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.target.arch, 10)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_benchmarker(self):
        raise RuntimeError("the stand-in sm_90 driver cannot time kernels")

    def assemble_tensormap_to_arg(self, tensormaps_info, args):
        return args

    # recording
    def _record(self, fn, metadata, grid, function, args) -> None:
        res = function.res
        names = list(fn.arg_names)
        tensors = [n for n, a in zip(names, args) if isinstance(a, torch.Tensor)]
        big = {n: a.numel() for n, a in zip(names, args) if isinstance(a, torch.Tensor) and a.numel() >= INT32_LIMIT}
        i32_only: list[str] = []
        if big:
            ttir = self._kernel_ttir(fn, metadata)
            narrow = int32_only_pointer_args(ttir, pointer_params(ttir, names, tensors))
            i32_only = [n for n in narrow if n in big]
        self.launches.append(
            Launch(
                kernel=fn.__name__,
                case=self.case,
                grid=tuple(int(g) for g in grid),
                num_warps=metadata.num_warps,
                num_stages=metadata.num_stages,
                shared=metadata.shared,
                regs=res["regs"],
                stack=res["stack"],
                local=res["local"],
                big_args=big,
                int32_only_args=i32_only,
            )
        )

    def _kernel_ttir(self, fn, metadata) -> str:
        # The compiled kernel is the last one cached for this JITFunction with this metadata hash.
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                if k.metadata is metadata or getattr(k.metadata, "hash", None) == getattr(metadata, "hash", 0):
                    return k.asm["ttir"]
        raise RuntimeError(f"{fn.__name__}: compiled kernel not found in its cache")


def jit_functions() -> dict[str, Any]:
    """name -> JITFunction for every @triton.jit function defined in dream_fast.kernels.*."""
    from triton.runtime.jit import JITFunction

    import dream_fast.kernels as pkg

    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"dream_fast.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                out[name] = obj
    return out


def _ops_modules() -> list[Any]:
    import dream_fast.kernels as pkg

    return [importlib.import_module(f"dream_fast.kernels.{i.name}") for i in pkgutil.iter_modules(pkg.__path__)]


def _clear_device_limits() -> None:
    """Triton caches the device's shared-memory limit per device index (lru_cache): drop it."""
    from triton.compiler import compiler

    cached = getattr(compiler, "max_shared_mem", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


@contextlib.contextmanager
def stand_in_sm90(capability: int = 90, props: dict[str, int] | None = None) -> Iterator[StandInDriver]:
    """Activate the stand-in driver and force the Triton path of every op (meta tensors included).

    JIT caches that hold the stand-in's target are dropped on exit, so a later real launch in the
    same process compiles for the real device."""
    from triton.runtime import driver as drv

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    fake = StandInDriver(capability, props)
    fns = jit_functions()
    mods = _ops_modules()
    patches = [mock.patch.object(m, "use_triton", lambda *t: True) for m in mods if hasattr(m, "use_triton")]
    # Launch-size helpers that ask the CUDA device (meta tensors would take their CPU branch): answer
    # as the stand-in's sm_90 device does, so the grid and the specialised arguments are the GPU's.
    sms = fake.utils.props["multiprocessor_count"]
    for m in mods:
        if hasattr(m, "_ln_bwd_programs"):  # adaln_block: 4 programs per SM for the LayerNorm backward
            patches.append(mock.patch.object(m, "_ln_bwd_programs", lambda N, device, sms=sms: min(N, 4 * sms)))
    prev = drv._active if hasattr(drv, "_active") else None
    for fn in fns.values():
        fn.device_caches.clear()
    _clear_device_limits()
    drv.set_active(fake)
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield fake
    finally:
        for fn in fns.values():
            fn.device_caches.clear()
        _clear_device_limits()
        if prev is None and hasattr(drv, "_active"):
            drv._active = None
        else:
            drv.set_active(prev)


# ----------------------------------------------------------------------------- TTIR: int64 offsets
_SSA = r"%[\w#.]+"
_FUNC_RE = re.compile(r"tt\.func public @\w+\((.*?)\)\s*(?:attributes\s*\{[^}]*\}\s*)?\{\s*$", re.S | re.M)
_PARAM_RE = re.compile(r"(%[\w.]+): (!tt\.ptr<[^>]+>|[\w]+)")
_PASSTHROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "ttg.convert_layout", "tt.trans")


def pointer_params(ttir: str, arg_names: list[str], tensor_args: list[str]) -> dict[str, str]:
    """TTIR SSA name -> Python argument name for the kernel's pointer parameters.

    Recent Triton names the SSA values after the Python arguments (%x_ptr); older versions number
    them (%arg0): those are matched in order to the arguments that were tensors."""
    m = _FUNC_RE.search(ttir)
    if not m:
        raise ValueError("no `tt.func public` in the TTIR")
    ptrs = [ssa for ssa, ty in _PARAM_RE.findall(m.group(1)) if ty.startswith("!tt.ptr")]
    if all(ssa[1:] in arg_names for ssa in ptrs):
        return {ssa: ssa[1:] for ssa in ptrs}
    if len(ptrs) != len(tensor_args):
        raise ValueError(f"{len(ptrs)} pointer parameters in the TTIR but {len(tensor_args)} tensor arguments")
    return dict(zip(ptrs, tensor_args))


def int32_only_pointer_args(ttir: str, params: dict[str, str]) -> list[str]:
    """Pointer arguments that some load/store/atomic reaches through i32 offsets only.

    Follows SSA values from each pointer parameter through splat/broadcast/expand_dims/reshape/
    convert_layout and `tt.addptr`; an addptr whose offset is i64 marks the chain as 64-bit. A memory
    op whose pointer chain has no i64 offset would wrap past 2^31 elements (int64
    addressing in every kernel whose tensors can pass 2^31 elements; docs/gpu.md)."""
    state: dict[str, tuple[str, bool]] = {ssa: (name, False) for ssa, name in params.items()}
    bad: set[str] = set()

    def use(ptr: str) -> None:
        if ptr in state and not state[ptr][1]:
            bad.add(state[ptr][0])

    for raw in ttir.splitlines():
        line = raw.strip()
        m = re.match(rf"({_SSA}) = (\S+) (.*)", line)
        if m:
            res, op, rest = m.groups()
            operands = re.findall(_SSA, rest.split(" : ")[0])
            if not operands:
                continue
            if op in _PASSTHROUGH and operands[0] in state:
                state[res] = state[operands[0]]
            elif op == "tt.addptr" and operands[0] in state:
                root, wide = state[operands[0]]
                offset_type = rest.rsplit(",", 1)[-1]
                state[res] = (root, wide or bool(re.search(r"\bi64\b|xi64>", offset_type)))
            elif op == "tt.load":
                use(operands[0])
            elif op in ("tt.atomic_rmw", "tt.atomic_cas"):
                for o in operands:
                    if o in state:
                        use(o)
                        break
        elif line.startswith(("tt.store ", "tt.atomic_rmw ")):
            operands = re.findall(_SSA, line.split(" : ")[0])
            if operands:
                use(operands[0])
    return sorted(bad)


# ----------------------------------------------------------------------------- cases
def _meta(shape, dtype, requires_grad=False) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype).requires_grad_(requires_grad)


@dataclass
class Case:
    op: str
    name: str
    dtype: str
    run: Callable[[], None]
    variant: str = "-"  # the op's `variant=` (and "det": deterministic backward), "-" for ops with none


# Each op's variants (kernels/*.py VARIANTS) with the default first; masked_gather's backward also
# has a deterministic (atomic-free) form, a DETERMINISTIC constexpr: both are compiled.
ADALN_VARIANTS = ("grouped", "baseline")
DECODER_FILL_VARIANTS = ("parallel", "serial")  # the backward's batch split (forward: one kernel)
MASKED_GATHER_VARIANTS = ("multirow", "multirow det", "baseline", "baseline det")


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    from dream_fast.kernels import dispatch

    prev = dispatch._deterministic
    dispatch.set_deterministic(enabled)
    try:
        yield
    finally:
        dispatch._deterministic = prev


def _fwd_bwd(fn: Callable, inputs: dict[str, Any], backward: bool) -> None:
    out = fn(**inputs)
    if backward:
        out.backward(torch.empty_like(out))


def masked_gather_case(
    size: str, dtype: torch.dtype, K: int, B: int = BATCH, backward: bool = True, variant: str = "multirow"
):
    """`variant`: "multirow" | "baseline", with " det" for the deterministic backward."""
    from dream_fast.kernels.masked_gather import masked_gather

    name, _, det = variant.partition(" ")

    D, S, L, C = SIZES[size]["D"], BUFFER, L_TOKENS, TOKEN_C
    p = lambda *s: _meta(s, dtype, backward)  # noqa: E731
    inputs = dict(
        tokens_BLC=p(B, L, C),
        keep_idx_BK=_meta((B, K), torch.int64),
        weight_DC=p(D, C),
        bias_D=p(D),
        pos_PD=p(S + L, D),
        buffer_SD=p(S, D),
        ln_weight_D=p(D),
        ln_bias_D=p(D),
        variant=name,
    )

    def run() -> None:
        with _deterministic(det == "det"):
            _fwd_bwd(masked_gather, inputs, backward)

    return run


def decoder_fill_case(
    size: str, dtype: torch.dtype, K: int, B: int = BATCH, backward: bool = True, variant: str = "parallel"
):
    from dream_fast.kernels.decoder_fill import decoder_fill

    D, S, L = SIZES[size]["D"], BUFFER, L_TOKENS
    inputs = dict(
        h_BSKD=_meta((B, S + K, D), dtype, backward),
        keep_idx_BK=_meta((B, K), torch.int64),
        mask_token_D=_meta((D,), dtype, backward),
        pos_PD=_meta((S + L, D), dtype, backward),
        L=L,
        variant=variant,
    )
    return lambda: _fwd_bwd(decoder_fill, inputs, backward)


def adaln_block_case(N: int, W: int, dtype: torch.dtype, backward: bool = True, variant: str = "grouped"):
    from dream_fast.kernels.adaln_block import adaln_block

    p = lambda *s: _meta(s, dtype, backward)  # noqa: E731
    inputs = dict(
        x_NW=p(N, W),
        y_NW=p(N, W),
        ln_w_W=p(W),
        ln_b_W=p(W),
        mod_w_3WW=p(3 * W, W),
        mod_b_3W=p(3 * W),
        fc1_w_WW=p(W, W),
        fc1_b_W=p(W),
        fc2_w_WW=p(W, W),
        fc2_b_W=p(W),
        variant=variant,
    )
    return lambda: _fwd_bwd(adaln_block, inputs, backward)


def guided_ddpm_step_case(N: int, C: int, dtype: torch.dtype, guided: bool = True, temp_tensor: bool = False):
    from dream_fast.kernels.guided_ddpm_step import guided_ddpm_step

    cond = _meta((N, 2 * C), dtype)
    inputs = dict(
        out_cond_N2C=cond,
        out_uncond_N2C=_meta((N, 2 * C), dtype) if guided else cond,
        x_NC=_meta((N, C), dtype),
        noise_NC=_meta((N, C), dtype),
        coef_7=_meta((7,), torch.float32),
        cfg_N=_meta((N,), torch.float32),
        temperature=_meta((), torch.float32) if temp_tensor else 0.9,
    )
    return lambda: _fwd_bwd(guided_ddpm_step, inputs, False)


def cases(sizes: tuple[str, ...] = ("B", "H", "G"), dtypes: tuple[str, ...] = tuple(DTYPES), quick: bool = False):
    """Launch cases at the training and sampling shapes of each size, plus the >= 2^31-element ones,
    each in every variant of its op (ADALN_VARIANTS, DECODER_FILL_VARIANTS, MASKED_GATHER_VARIANTS).

    Training: batch 64, K = 64 kept tokens (75% masked) and K = 0..256 edge values; head rows
    N = 64 x 256 x diffusion_batch_mul (all tokens masked: the largest head batch) and
    N = 64 x 192 x 4 (75%); sampling: N = 1 x 16 (batch 1, 16 tokens per step) and 32 x 64 x 2
    (batch 32, 64 tokens, cond + uncond rows). Big: shapes whose tensors pass 2^31 elements.
    Forward-only (sampling) cases run the variants whose forward differs: masked_gather's
    multirow/baseline and adaln's grouped/baseline; decoder_fill's variants differ in the backward."""
    out: list[Case] = []
    W = SIZES["B"]["W"]
    mg_fwd = [v for v in MASKED_GATHER_VARIANTS if not v.endswith(" det")]
    for dt in dtypes:
        t = DTYPES[dt]
        for size in sizes:
            for K in ((64,) if quick else (64, 1, 256, 77)):
                for v in MASKED_GATHER_VARIANTS:
                    out.append(Case("masked_gather", f"{size} train K={K}", dt,
                                    masked_gather_case(size, t, K, variant=v), v))
                for v in DECODER_FILL_VARIANTS:
                    out.append(Case("decoder_fill", f"{size} train K={K}", dt,
                                    decoder_fill_case(size, t, K, variant=v), v))
            if not quick:
                for v in mg_fwd:
                    out.append(Case("masked_gather", f"{size} sample B=32 K=128", dt,
                                    masked_gather_case(size, t, 128, B=32, backward=False, variant=v), v))
                out.append(Case("decoder_fill", f"{size} sample B=32 K=128", dt,
                                decoder_fill_case(size, t, 128, B=32, backward=False), DECODER_FILL_VARIANTS[0]))
        # the head's width is 1024 at every size: its shapes do not depend on `size`
        head_rows = [BATCH * L_TOKENS * DIFF_MUL] + ([] if quick else [BATCH * 192 * DIFF_MUL, 4096, 1000])
        for v in ADALN_VARIANTS:
            for N in head_rows:
                out.append(Case("adaln_block", f"head train N={N}", dt, adaln_block_case(N, W, t, variant=v), v))
            for N in [16] + ([] if quick else [32 * 64 * 2, 7]):
                out.append(Case("adaln_block", f"head sample N={N}", dt,
                                adaln_block_case(N, W, t, backward=False, variant=v), v))
        for N, guided, tt in [(16, True, False), (32 * 64, True, True)] + ([] if quick else [(1000, False, False)]):
            out.append(Case("guided_ddpm_step", f"sample N={N}{' cfg' if guided else ''}{' temp-tensor' if tt else ''}",
                            dt, guided_ddpm_step_case(N, TOKEN_C, t, guided, tt)))
    # >= 2^31 elements: int64 addressing (one dtype is enough: the offsets do not depend on it)
    dt = dtypes[0]
    t = DTYPES[dt]
    big_n = INT32_LIMIT // W + 64  # head rows whose (N, W) tensors pass 2^31 elements
    for v in ADALN_VARIANTS:
        out.append(Case("adaln_block", f"big N={big_n}", dt, adaln_block_case(big_n, W, t, variant=v), v))
    out.append(Case("guided_ddpm_step", "big N=2^27+", dt, guided_ddpm_step_case(INT32_LIMIT // 16 + 64, 32, t)))
    big_b = INT32_LIMIT // ((BUFFER + L_TOKENS) * SIZES["G"]["D"]) + 1
    for v in MASKED_GATHER_VARIANTS:
        out.append(Case("masked_gather", f"big G B={big_b} K=256", dt,
                        masked_gather_case("G", t, 256, B=big_b, variant=v), v))
    for v in DECODER_FILL_VARIANTS:
        out.append(Case("decoder_fill", f"big G B={big_b} K=256", dt,
                        decoder_fill_case("G", t, 256, B=big_b, variant=v), v))
    return out


# ----------------------------------------------------------------------------- run + checks
@dataclass
class Row:
    op: str
    case: str
    variant: str
    dtype: str
    kernel: str
    grid: str
    warps: int
    stages: int
    threads: int
    shared: int
    regs: int
    regs_x_threads: int
    stack: int
    local: int
    int64_ok: str
    status: str


CSV_FIELDS = list(Row.__dataclass_fields__)


def check(launch: Launch, dtype: str) -> list[str]:
    problems = []
    if launch.shared > SM90["max_shared_mem"]:
        problems.append(f"shared {launch.shared} B > {SM90['max_shared_mem']} B")
    if launch.regs * launch.threads > SM90["max_num_regs"]:
        problems.append(f"{launch.regs} regs x {launch.threads} threads > {SM90['max_num_regs']}")
    if launch.spill_bytes and dtype != "fp32":
        problems.append(f"spills ({launch.stack} B stack, {launch.local} B local)")
    if launch.int32_only_args:
        problems.append(f"i32-only offsets into >= 2^31-element {launch.int32_only_args}")
    return problems


def run_cases(selected: list[Case], log: Callable[[str], None] = print) -> tuple[list[Row], set[str], list[str]]:
    """Run every case under the stand-in driver. Returns (rows, launched kernel names, errors)."""
    rows: list[Row] = []
    launched: set[str] = set()
    errors: list[str] = []
    with stand_in_sm90() as drv:
        for c in selected:
            drv.case = c.name
            n0 = len(drv.launches)
            t0 = time.monotonic()
            try:
                c.run()
            except Exception as e:  # noqa: BLE001 - one failing kernel is reported, the rest still run
                first = str(e).splitlines()[0][:300] if str(e) else ""
                errors.append(f"{c.op} [{c.name}, {c.variant}, {c.dtype}]: {type(e).__name__}: {first}")
                log(f"FAIL {c.op} [{c.name}, {c.variant}, {c.dtype}]: {type(e).__name__}: {e}")
                continue
            seen = set()
            for ln in drv.launches[n0:]:
                launched.add(ln.kernel)
                key = (ln.kernel, ln.regs, ln.shared, ln.num_warps, ln.num_stages, tuple(ln.int32_only_args))
                if key in seen:  # one row per distinct compiled kernel per case
                    continue
                seen.add(key)
                problems = check(ln, c.dtype)
                note = ""
                if not problems and ln.spill_bytes:
                    note = f"fp32 spills ({ln.stack} B stack, {ln.local} B local)"
                rows.append(
                    Row(
                        op=c.op,
                        case=c.name,
                        variant=c.variant,
                        dtype=c.dtype,
                        kernel=ln.kernel,
                        grid="x".join(map(str, ln.grid)),
                        warps=ln.num_warps,
                        stages=ln.num_stages,
                        threads=ln.threads,
                        shared=ln.shared,
                        regs=ln.regs,
                        regs_x_threads=ln.regs * ln.threads,
                        stack=ln.stack,
                        local=ln.local,
                        int64_ok=("yes" if not ln.int32_only_args else "NO") if ln.big_args else "-",
                        status="FAIL: " + "; ".join(problems) if problems else ("ok" + (f" ({note})" if note else "")),
                    )
                )
            n = len(drv.launches) - n0
            log(f"  {c.op:18s} {c.name:28s} {c.variant:12s} {c.dtype}: {n} launches in {time.monotonic() - t0:.1f}s")
    return rows, launched, errors


def uncovered(launched: set[str]) -> list[str]:
    """@triton.jit functions in kernels/ neither launched nor called from a launched kernel."""
    fns = jit_functions()
    covered = set(launched)
    for name in launched:
        src = fns[name].src if name in fns else ""
        covered |= {h for h in fns if h != name and re.search(rf"\b{re.escape(h)}\s*\(", src)}
    return sorted(set(fns) - covered)


def default_csv() -> Path:
    import triton

    return RESULTS_DIR / SM90_TABLES / f"triton{triton.__version__}.csv"


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r.__dict__)


def format_rows(rows: list[Row]) -> str:
    cols = ["op", "case", "variant", "dtype", "kernel", "warps", "stages", "shared", "regs", "regs_x_threads", "stack",
            "int64_ok", "status"]
    table = [cols] + [[str(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one training and sampling shape per op (the CI set)")
    ap.add_argument("--sizes", default="B,H,G", help="model sizes (comma list of B, H, G)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--out", default=None, help=f"CSV path (default benchmarks/results/{SM90_TABLES}/triton<v>.csv)")
    args = ap.parse_args(argv)
    import triton

    t0 = time.monotonic()
    sel = cases(tuple(args.sizes.split(",")), tuple(args.dtypes.split(",")), quick=args.quick)
    print(f"# sm_90 compile check: triton {triton.__version__}, torch {torch.__version__}, {len(sel)} cases")
    rows, launched, errors = run_cases(sel)
    out = Path(args.out) if args.out else default_csv()
    write_csv(rows, out)
    print(format_rows(rows))
    missing = uncovered(launched)
    bad = [r for r in rows if r.status.startswith("FAIL")]
    print(
        f"\n{len(rows)} kernel rows, {len(bad)} failing, {len(errors)} case errors; "
        f"never compiled: {missing or 'none'}; "
        f"wrote {out} in {time.monotonic() - t0:.0f}s"
    )
    for e in errors:
        print("ERROR", e)
    return 1 if bad or errors or missing else 0


if __name__ == "__main__":
    sys.exit(main())
