"""Training observability: JSONL + TensorBoard + console lines, throughput, TFLOP/s and MFU.

FLOP model: dream_fast.model.flops_per_sample(cfg.model, r) = 3 x the forward matmul FLOPs of one
image at mask ratio r (encoder on visible tokens, decoder on all tokens with cross-attention, text
aligner and tower, diffusion head on masked tokens x diffusion_batch_mul); elementwise ops are not
counted. MFU = achieved FLOP/s / (peak FLOP/s per device x devices). Peak: a table of dense bf16
tensor-core peaks for known GPUs, else a matmul measured on this device at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 peak TFLOP/s from the vendors' datasheets.
GPU_PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def measured_matmul_tflops(device: torch.device, n: int | None = None, dtype: torch.dtype | None = None) -> float:
    """Achieved TFLOP/s of an n x n matmul right now (fp32 on CPU, bf16 on CUDA)."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 512)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    reps = 10 if cuda else 5
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def peak_tflops(device: torch.device, precision: str = "fp32") -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the number comes from). Without a datasheet entry, a matmul
    measured in the run's precision (bf16 matmuls run 2-3x faster than fp32 on CPUs with AVX512-BF16)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"datasheet bf16 peak for {name}"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # None: the device's default
    return measured_matmul_tflops(device, dtype=dtype), f"measured {precision} matmul"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the process's resident high-water mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MetricsLogger:
    """Rank 0 writes out_dir/metrics.jsonl (one JSON object per log step) and TensorBoard events."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception as e:  # noqa: BLE001 - tensorboard is optional
                log.info("TensorBoard logging off (%s)", e)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites the steps a killed run had logged)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a run directory or the file itself), last record per step."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no metrics file at {p} (give a run directory written by `dream-fast train`)")
    by_step: dict[int, dict[str, Any]] = {}
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step[int(rec.get("step", 0))] = rec
    return [by_step[s] for s in sorted(by_step)]


def format_line(step: int, total: int, rec: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", ".4f"), ("loss_diff", ".4f"), ("loss_clip", ".4f"), ("mask_ratio", ".2f"),
                     ("lr", ".2e"), ("samples_per_s", ".1f"), ("mfu", ".3f"), ("data_wait", ".2f")):  # fmt: skip
        if key in rec and rec[key] is not None:
            parts.append(f"{key} {format(rec[key], fmt)}")
    return " | ".join(parts)
