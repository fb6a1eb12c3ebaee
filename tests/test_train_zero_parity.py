"""DeepSpeed ZeRO 0/1/2/3 on 2 gloo ranks == one process on the concatenated batch (fp32).

Both sides run the trainer's own StepRunner (forward, backward, clipping, AdamW groups, logit-scale
clamp, EMA) on a minimal DREAM; see tests/_train_parity_worker.py for how per-rank randomness is
made per-sample so the two runs see the same draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_helpers import run_ranks
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_train_parity_worker.py"
STEPS = 5


def _run_ranks(out: Path, stages: str, engine: str, world: int) -> None:
    run_ranks("_train_parity_worker.py", world, str(out), stages, engine, timeout=600)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero_stages_match_single_process(tmp_path: Path) -> None:
    _run_ranks(tmp_path, "0", "torch", world=1)
    _run_ranks(tmp_path, "0,1,2,3", "deepspeed", world=2)
    ref = json.loads((tmp_path / "torch_losses.json").read_text())["0"]
    dist = json.loads((tmp_path / "deepspeed_losses.json").read_text())
    ref_w = load_file(str(tmp_path / "torch_stage0.safetensors"))
    assert ref["grad_norms"][0] > 0.05, "the test's clip must be active for the norm to matter"
    for stage in ("0", "1", "2", "3"):
        losses = dist[stage]["losses"]
        for step in range(STEPS):
            assert abs(losses[step] - ref["losses"][step]) < 1e-5, (stage, step, losses[step], ref["losses"][step])
        # below-threshold step on every rank: all stages agree with each other (not with the reference)
        assert abs(losses[STEPS] - dist["0"]["losses"][STEPS]) < 1e-5, stage
        w = load_file(str(tmp_path / f"deepspeed_stage{stage}.safetensors"))
        assert set(w) == set(ref_w)
        # Weights and EMA after the parity steps (ZeRO-3: gathered from the shards). Adam turns the
        # rounding noise of gradients that are zero in exact arithmetic (a Linear bias right before
        # BatchNorm) into updates of up to lr, so elements are compared at a fraction of lr and the
        # whole vector at a tight relative tolerance.
        for prefix in ("param.", "ema."):
            keys = [k for k in ref_w if k.startswith(prefix)]
            a = torch.cat([w[k].reshape(-1) for k in keys])
            b = torch.cat([ref_w[k].reshape(-1) for k in keys])
            assert (a - b).norm() / b.norm() < 1e-4, (stage, prefix, ((a - b).norm() / b.norm()).item())
            for k in keys:
                torch.testing.assert_close(
                    w[k], ref_w[k], atol=5e-4, rtol=0, msg=lambda m, k=k, s=stage: f"{s} {k}: {m}"
                )
        assert w["ema.logit_scale"].shape == torch.Size([]), "EMA keeps the model's own parameter shapes"
    moved = max(
        (ref_w[f"ema.{k[6:]}"] - v).abs().max().item()
        for k, v in ref_w.items()
        if k.startswith("param.") and f"ema.{k[6:]}" in ref_w
    )
    assert moved > 1e-4, "EMA must differ from the weights (decay 0.9), or the comparison says nothing"
