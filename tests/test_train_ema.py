"""The EMA under DeepSpeed bf16 reads the fp32 masters, sharded over the ranks; rank 0 assembles it."""

from __future__ import annotations

import json

import pytest
import torch
from _train_helpers import run_ranks
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_ema_follows_fp32_masters_sharded(tmp_path):
    run_ranks("_ema_worker.py", 2, str(tmp_path))
    shares = [json.loads((tmp_path / f"shares_rank{r}.json").read_text()) for r in range(2)]
    for stage in ("1", "2", "3"):
        t = load_file(str(tmp_path / f"ema_z{stage}.safetensors"))
        names = [k[4:] for k in t if k.startswith("ema.")]
        total = sum(t[f"ema.{n}"].numel() for n in names)
        assert set(names) == {k[6:] for k in t if k.startswith("ref32.")}
        for n in names:
            torch.testing.assert_close(t[f"ema.{n}"], t[f"ref32.{n}"], rtol=0, atol=0, msg=f"ZeRO-{stage} {n}")
        # the test tells the two apart: an EMA of the bf16 weights differs from the EMA of the masters
        drift = max((t[f"ref16.{n}"] - t[f"ref32.{n}"]).abs().max().item() for n in names)
        assert drift > 0
        # sharded: each rank holds about half the elements (ZeRO-3 pads; ZeRO-1/2 split flat groups)
        per_rank = [s[stage] for s in shares]
        assert sum(per_rank) == total, (stage, per_rank, total)
        assert max(per_rank) < 0.75 * total, (stage, per_rank, total)
