"""Config loading, validation errors that name the field, presets and meta-device parameter counts."""

import pytest

from dream_fast.config import ConfigError, config_from_dict, get_preset, load_config
from dream_fast.model.dream import build_model, count_params


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_with_preset_and_override(tmp_path):
    cfg = load_config(_write(tmp_path, "preset: tiny\ntrain:\n  batch_size: 8\n"), ["model.enc_depth=2"])
    assert cfg.train.batch_size == 8 and cfg.model.enc_depth == 2 and cfg.model.tokenizer == "pixel"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("model:\n  enc_widht: 3\n", "model.enc_widht"),
        ("model:\n  enc_width: big\n", "model.enc_width"),
        ("model:\n  tokenizer: jpeg\n", "allowed values"),
        ("train:\n  zero_stage: 4\n", "train.zero_stage"),
        ("model:\n  enc_width: 100\n  enc_heads: 12\n", "multiple of model.enc_heads"),
        ("sample:\n  cfg: 0.5\n", "sample.cfg"),
        ("optim:\n  betas: [0.9]\n", "optim.betas"),
        ("optim:\n  blr: 1e-4x\n", "optim.blr: expected a number"),
        ("model:\n  pos_init: sincos\n  enc_width: 126\n  enc_heads: 6\n", "divisible by 4"),
        ("data:\n  shapes_group_size: 4\n", "data.shapes_group_size must be in"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; a float field accepts it (files and command-line overrides)
    cfg = load_config(_write(tmp_path, "optim:\n  blr: 1e-4\n"), ["loss.clip_weight=5e-3"])
    assert cfg.optim.blr == 1e-4 and cfg.loss.clip_weight == 5e-3


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("XXL")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_dict():
    cfg = get_preset("H")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("size,target", [("B", None), ("L", None), ("H", 1.1e9), ("G", 2.4e9)])
def test_param_counts_on_meta(size, target):
    cfg = get_preset(size)
    model = build_model(cfg.model, cfg.loss, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    n = count_params(model)
    print(f"DREAM-{size}: {n / 1e6:.1f}M parameters")
    if target:
        assert abs(n - target) / target < 0.15
    else:
        assert 1e8 < n < 1.1e9


def test_size_ordering_and_tiny_size():
    counts = [count_params(build_model(get_preset(s).model, device="meta")) for s in "BLHG"]
    assert counts == sorted(counts)
    tiny = count_params(build_model(get_preset("tiny").model, device="meta"))
    assert 1.5e6 < tiny < 6e6
