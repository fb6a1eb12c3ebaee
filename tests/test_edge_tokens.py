"""benchmarks/edge_tokens: the pixel-error reading, the yardsticks, and a head that learns edges from a
perfect z while an untrained model does not."""

import torch
from bundle_helpers import tiny_bundle

from benchmarks.edge_tokens import context_fill, head_alone, linear_readout, pixel_error, shapes_tokens
from dream_fast.config import get_preset
from dream_fast.pretrained import load_pretrained


def test_pixel_error_counts_pixels_on_the_wrong_side():
    fg, bg = torch.tensor([[1.0, -1.0, -1.0]]), torch.tensor([[-1.0, -1.0, 1.0]])
    half = torch.cat([fg.T.expand(3, 8), bg.T.expand(3, 8)], 1).reshape(1, 48)  # 8 shape, 8 background px
    flipped = torch.cat([bg.T.expand(3, 8), fg.T.expand(3, 8)], 1).reshape(1, 48)
    assert pixel_error(half, half, fg, bg) == 0.0
    assert pixel_error(flipped, half, fg, bg) == 1.0
    assert pixel_error(fg.T.expand(3, 16).reshape(1, 48), half, fg, bg) == 0.5


def test_shapes_tokens_find_edges_and_colours():
    d = shapes_tokens(get_preset("tiny").model, 8)
    edge = d["edge"]
    assert edge.any(dim=1).all()  # every image has edge tokens (shapes are 10-13 px, tokens 4 px)
    assert ((d["cover"] == 1).sum(1) <= (d["cover"] > 0).sum(1)).all()
    assert d["fg"].shape == (8, 3) and d["fg"].abs().max() <= 1


def test_linear_readout_recovers_what_the_features_hold():
    d = shapes_tokens(get_preset("tiny").model, 40)
    img, pos = d["edge"].nonzero(as_tuple=True)
    truth, fg, bg = d["x0"][img, pos], d["fg"][img], d["bg_rgb"][img]
    assert linear_readout(truth, truth, fg, bg) < 0.03  # the token itself (antialiased pixels sit near halfway)
    noise = torch.randn(truth.shape[0], 32, generator=torch.Generator().manual_seed(0))
    assert linear_readout(noise, truth, fg, bg) > 0.2  # features that know nothing of it


def test_head_alone_learns_edges_from_a_perfect_z():
    cfg = get_preset("tiny").model
    res = head_alone(cfg, steps=400, rows=1024, lr=2e-3, n=200)
    assert res["whole tokens, majority"] < res["all-shape tokens"]
    assert res["model"] < res["whole tokens, majority"], res  # it draws inside tokens, not whole tokens


def test_context_fill_runs_on_a_bundle(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    res = context_fill(load_pretrained(bundle), n=4, chunk=7)
    assert res["edge tokens"] > 0 and 0 < res["edge-token share"] < 0.5
    for k in ("model", "readout: encoder output", "readout: decoder z"):
        assert 0.0 <= res[k] <= 1.0
    assert res["whole tokens, majority"] < res["all-shape tokens"]
