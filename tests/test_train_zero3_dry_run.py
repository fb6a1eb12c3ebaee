"""ZeRO-3's dry run (register_external_params) runs the model on the model's own device: on a GPU
the model has already moved to CUDA when the dry-run inputs are made, and CPU inputs would fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_parity_worker import mini_cfg  # noqa: E402

from dream_fast.model import build_model  # noqa: E402
from dream_fast.train.inputs import dummy_inputs  # noqa: E402


def test_dry_run_inputs_follow_the_model_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zero = pytest.importorskip("deepspeed", reason="ZeRO-3 registration needs deepspeed").zero
    from dream_fast.train.engine import register_external_params

    registered: list[torch.nn.Parameter] = []
    monkeypatch.setattr(zero, "register_external_parameter", lambda module, p: registered.append(p))
    cfg = mini_cfg(3, "torch", tmp_path)
    # "meta" stands in for cuda: a device the CPU-made inputs are not on
    model = build_model(cfg.model, cfg.loss).to("meta")
    seen: list[torch.device] = []

    def record(_mod, args, kwargs):
        seen.extend(v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))

    model.register_forward_pre_hook(record, with_kwargs=True)
    n = register_external_params(model, dummy_inputs(cfg, 2, torch.device("cpu")))
    assert seen and all(d.type == "meta" for d in seen), seen
    assert n == len(registered) > 0, "the fused kernels read some weights outside their module's forward"
    assert all(p.device.type == "meta" for p in registered)
