"""The generated DeepSpeed JSON: overlapped, fp32 gradient reduction for the configs users launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dream_fast.config import load_config
from dream_fast.train.engine import deepspeed_config

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_CONFIGS = sorted((ROOT / "configs").glob("*_cc12m.yaml"))


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.stem)
def test_launch_configs_overlap_and_reduce_in_fp32(path: Path) -> None:
    cfg = load_config(path)
    ds = deepspeed_config(cfg, world_size=32)
    zero = ds["zero_optimization"]
    assert zero["stage"] == cfg.train.zero_stage >= 1
    assert zero["overlap_comm"] is True, "safe since every rank builds the same graph (mixed-ratio parity test)"
    assert ds["communication_data_type"] == "fp32"
    assert ds["train_batch_size"] == cfg.train.batch_size * cfg.train.grad_accum * 32


def test_user_json_can_turn_overlap_off(tmp_path: Path) -> None:
    cfg = load_config(LAUNCH_CONFIGS[0])
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "communication_data_type": "bf16"}))
    cfg.train.deepspeed_config = str(user)
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["communication_data_type"] == "bf16"
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
