"""Fréchet distance / Inception Score math against closed forms, stats files, FID error messages."""

import importlib.util

import numpy as np
import pytest

from dream_fast.eval.fid import (
    MissingDependencyError,
    feature_stats,
    fid_with_torch_fidelity,
    frechet_distance,
    inception_score,
    load_stats,
    save_stats,
)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    # For commuting (diagonal) covariances: |mu1-mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(300, 8)) * 2.0 + 1.0
    mu_a, s_a = feature_stats(a)
    mu_b, s_b = feature_stats(b)
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-8
    d_ab, d_ba = frechet_distance(mu_a, s_a, mu_b, s_b), frechet_distance(mu_b, s_b, mu_a, s_a)
    assert d_ab > 1.0 and d_ab == pytest.approx(d_ba, rel=1e-6)


def test_frechet_distance_rank_deficient_covariances():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(20, 50))  # N < D: singular covariance
    mu, s = feature_stats(f)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-3
    shifted = frechet_distance(mu, s, mu + 1.0, s)
    assert shifted == pytest.approx(50.0, abs=1e-3)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_uniform_and_one_hot():
    assert inception_score(np.full((100, 10), 0.1), splits=5) == pytest.approx((1.0, 0.0), abs=1e-9)
    one_hot = np.eye(10)[np.arange(100) % 10]
    mean, std = inception_score(one_hot, splits=10)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-9)
    # confident but only 2 of 10 classes used -> 2
    two = np.eye(10)[np.arange(100) % 2]
    assert inception_score(two, splits=1)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.ones((4, 3)))


def test_stats_file_roundtrip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    p = save_stats(tmp_path / "ref.npz", mu, sigma, n=7)
    mu2, s2 = load_stats(p)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, s2)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "missing.npz")


def _gen_dir(tmp_path):
    from PIL import Image

    d = tmp_path / "gen"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(d / f"{i}.png")
    return d


def test_fid_missing_weights_names_the_flag(tmp_path):
    gen = _gen_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        fid_with_torch_fidelity(gen, tmp_path / "ref.npz", None)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        fid_with_torch_fidelity(gen, tmp_path / "ref.npz", tmp_path / "nope.pth")


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None
    and importlib.util.find_spec("torch_fidelity") is not None,
    reason="the fid extra is installed here",
)
def test_fid_without_extra_names_the_extra(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not used")
    with pytest.raises(MissingDependencyError, match=r"dream-fast\[fid\]"):
        fid_with_torch_fidelity(_gen_dir(tmp_path), tmp_path / "ref.npz", weights)


def _has_fid_extra() -> bool:
    try:
        import torch_fidelity  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(
    not _has_fid_extra(),
    reason="torch-fidelity/torchvision not importable (the `fid` extra; "
    "PyPI torchvision does not import beside the CPU torch build here)",
)
def test_fid_with_torch_fidelity_integration(tmp_path):
    import os

    weights = os.environ.get("DREAM_INCEPTION_WEIGHTS")
    if not weights or not os.path.isfile(weights):
        pytest.skip("set DREAM_INCEPTION_WEIGHTS to a local Inception weights file to run this test")
    from dream_fast.data import make_sample

    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(20):
        make_sample(0, "val", i)[0].save(gen / f"{i}.png")
    res = fid_with_torch_fidelity(gen, gen, weights, is_splits=2, save_ref_stats=tmp_path / "ref.npz")
    assert abs(res["fid"]) < 1e-3 and res["n_gen"] == 20
    res2 = fid_with_torch_fidelity(gen, tmp_path / "ref.npz", weights, is_splits=2)
    assert res2["fid"] == pytest.approx(res["fid"], abs=1e-3)
