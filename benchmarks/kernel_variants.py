"""Kernel variants in one benchmark run: every provider (reference, compiled, each Triton variant)
timed on the same inputs, then each one's speed-up over the eager PyTorch reference printed.

Used by benchmarks/benchmark_<kernel>.py. On CPU the Triton providers only run under
TRITON_INTERPRET=1, where their times measure the interpreter, not the kernel: a smoke run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

from benchmarks.common import op_main


def providers(device: str, variants: Sequence[str]) -> list[str]:
    """reference, compiled and `variants` (e.g. triton, triton-baseline) where Triton can run."""
    out = ["reference", "compiled"]
    if torch.device(device).type == "cuda":
        out += list(variants)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out = ["reference", *variants]  # compiling on a shared 2-core box is not a smoke test
    return out


def split_provider(provider: str, default_variant: str, allowed: Sequence[str]) -> str:
    """"triton" -> the default variant, "triton-<v>" -> v; anything else is an error."""
    if provider == "triton":
        return default_variant
    v = provider.removeprefix("triton-")
    if not provider.startswith("triton-") or v not in allowed:
        names = ", ".join(["reference", "compiled", "triton", *(f"triton-{a}" for a in allowed)])
        raise ValueError(f"provider {provider!r} unknown; allowed: {names}")
    return v


def ratio_table(rows: Sequence[dict]) -> str:
    """Markdown lines: per (shape, mode, dtype), each provider's p50 and reference p50 / its p50."""
    ref = {(r["shape"], r["mode"], r["dtype"]): r["p50_ms"] for r in rows if r["provider"] == "reference"}
    lines = ["| shape | mode | provider | p50 ms | vs reference |", "|---|---|---|---|---|"]
    for r in rows:
        base = ref.get((r["shape"], r["mode"], r["dtype"]))
        ratio = f"{base / r['p50_ms']:.3g}x" if base and r["p50_ms"] else "-"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['p50_ms']:.4g} | {ratio} |")
    return "\n".join(lines)


def variant_main(module, argv: list[str] | None = None) -> list[dict]:
    """op_main with the module's variant providers as the default, then the ratio table."""
    argv = list(argv if argv is not None else sys.argv[1:])
    if not any(a.startswith("--providers") for a in argv):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        argv += ["--providers", ",".join(providers(device, module.TRITON_PROVIDERS))]
    rows = op_main(module, argv)
    print()
    print(ratio_table(rows))
    if not torch.cuda.is_available():
        print(
            "\n(CPU: Triton rows, if any, ran under the interpreter, which times Python, not the "
            "kernel: a smoke run only. GPU figures: python -m benchmarks.gpu_suite.)"
        )
    return rows
