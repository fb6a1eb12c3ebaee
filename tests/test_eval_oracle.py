"""Shapes attribute oracle: accuracy on fresh renders (seen and held-out), chance on noise, FD, prompts."""

import numpy as np
import pytest

from dream_fast.data import make_sample
from dream_fast.eval.oracle import (
    ATTRIBUTES,
    oracle_accuracy,
    oracle_report,
    read_image,
    shapes_eval_prompts,
    shapes_fd,
    wilson_interval,
)

# Seeds the data writer does not use by default, so these are renders no one tuned on.
SEED = 98765


def _renders(split, n, seed=SEED, img_size=32):
    ims, metas = [], []
    for i in range(n):
        im, _, meta = make_sample(seed, split, i, img_size=img_size)
        ims.append(im)
        metas.append(meta)
    return ims, metas


@pytest.mark.parametrize("split", ["val", "heldout"])
def test_oracle_reads_fresh_renders(split):
    ims, metas = _renders(split, 600)
    acc = oracle_accuracy(ims, metas)
    assert acc["n"] == 600
    for a in ATTRIBUTES:
        assert acc[a] >= 0.99, (a, acc)
    assert acc["all"] >= 0.99


def test_oracle_other_image_sizes_and_mild_noise():
    ims, metas = _renders("val", 150, img_size=64)
    assert oracle_accuracy(ims, metas)["all"] >= 0.98
    rng = np.random.default_rng(0)
    small, metas = _renders("val", 200)
    noisy = [np.clip(np.asarray(im, float) + rng.normal(0, 12, (32, 32, 3)), 0, 255) for im in small]
    acc = oracle_accuracy(noisy, metas)
    assert min(acc[a] for a in ATTRIBUTES) >= 0.97, acc


def test_oracle_is_near_chance_on_noise():
    rng = np.random.default_rng(1)
    n = 600
    noise = [rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(n)]
    _, metas = _renders("val", n)
    acc = oracle_accuracy(noise, metas)
    chance = {"shape": 1 / 3, "colour": 1 / 8, "position": 1 / 9, "size": 1 / 2, "background": 1 / 4}
    for a, c in chance.items():
        # 5 binomial standard deviations around chance (labels are independent of noise)
        assert abs(acc[a] - c) < 5 * np.sqrt(c * (1 - c) / n) + 0.02, (a, acc[a], c)
    assert acc["all"] < 0.02


def test_oracle_report_splits_seen_and_heldout():
    a_ims, a_metas = _renders("val", 40)
    b_ims, b_metas = _renders("heldout", 30)
    # spoil the held-out readings' labels so the split is visible in the numbers
    b_metas = [{**m, "shape_id": (m["shape_id"] + 1) % 3} for m in b_metas]
    rep = oracle_report(a_ims + b_ims, a_metas + b_metas)
    assert rep["seen"]["n"] == 40 and rep["heldout"]["n"] == 30 and rep["overall"]["n"] == 70
    assert rep["seen"]["shape"] == 1.0 and rep["heldout"]["shape"] == 0.0
    assert rep["overall"]["shape"] == pytest.approx(40 / 70)
    with pytest.raises(ValueError, match="shape_id"):
        oracle_accuracy(a_ims[:1], [{"colour_id": 0}])


def test_shapes_fd_small_for_same_distribution_large_for_shifted():
    a, _ = _renders("val", 300, seed=1)
    b, b_metas = _renders("val", 900, seed=2)
    # a shifted distribution: mostly centred shapes or black backgrounds
    shifted = [im for im, m in zip(b, b_metas) if m["position"] == "center" or m["background"] == "black"]
    same, different = shapes_fd(a, b[:300]), shapes_fd(a, shifted)
    assert same >= -1e-6 and different > 5 * max(same, 1e-3), (same, different)


def test_read_image_reports_nothing_found_on_a_blank_image():
    blank = np.full((32, 32, 3), 120, np.uint8)
    r = read_image(blank)
    assert not r.found and r.background_id == 0  # gray


def test_shapes_eval_prompts_match_the_data():
    for split in ("val", "heldout"):
        pairs = shapes_eval_prompts(20, split, seed=5)
        for i, (cap, meta) in enumerate(pairs):
            _, cap2, meta2 = make_sample(5, split, i)
            assert cap == cap2 and meta == meta2
        assert all(m["heldout"] == (split == "heldout") for _, m in pairs)
    with pytest.raises(ValueError, match="split"):
        shapes_eval_prompts(3, "test")


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.192, abs=0.005)
    assert wilson_interval(100, 100)[1] == pytest.approx(1.0)
