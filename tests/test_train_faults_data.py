"""Data at scale (docs/training.md, "Running at scale"): remote (`pipe:`) shards are never streamed
to count them, and a `dream-fast cache` read through `pipe:` commands fetches its side files the
same way. `pipe:cat FILE` stands in for `pipe:aws s3 cp s3://... -`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import mini_config, write_config

from dream_fast.config import ConfigError, load_config
from dream_fast.data import shards as S
from dream_fast.data.bpe import BPETokenizer
from dream_fast.data.shapes import write_shapes_shards
from dream_fast.dist import DistInfo

CPU_ONE = DistInfo(0, 1, 0, torch.device("cpu"), False)


def _pipe(pattern: str) -> str:
    return f"pipe:cat {pattern}"


def test_remote_shards_are_counted_from_their_manifest_never_streamed(tmp_path: Path, monkeypatch) -> None:
    write_shapes_shards(tmp_path / "w", 40, 0, 0, seed=1, img_size=16, samples_per_shard=16, progress=False)
    local = str(tmp_path / "w" / "train-{00000..00002}.tar")
    assert S.count_samples(local) == 40
    calls: list[str] = []
    real = S.iter_raw_samples

    def spy(url, *a, **k):
        calls.append(url)
        return real(url, *a, **k)

    monkeypatch.setattr(S, "iter_raw_samples", spy)
    assert S.count_samples(_pipe(local)) == 40  # manifest.json next to the shards, fetched by `cat`
    assert calls == []  # no shard was read
    (tmp_path / "w" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="data.epoch_size"):
        S.count_samples(_pipe(local))
    assert calls == []


def test_remote_webdataset_without_a_count_fails_before_any_work(tmp_path: Path) -> None:
    from dream_fast.data.setup import build_train_data

    write_shapes_shards(tmp_path / "w", 16, 0, 0, seed=1, img_size=16, samples_per_shard=16, progress=False)
    (tmp_path / "w" / "manifest.json").unlink()
    shards = _pipe(str(tmp_path / "w" / "train-00000.tar"))
    cfg = load_config(write_config(tmp_path / "c.yaml", mini_config(
        tmp_path, data={"source": "webdataset", "shards": shards, "num_workers": 0}))).validate()  # fmt: skip
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="data.epoch_size"):
        build_train_data(cfg, tmp_path / "run", CPU_ONE)
    assert not (tmp_path / "run" / "tokenizer.json").exists()  # no caption was streamed to train one
    cfg.data.epoch_size = 16
    data = build_train_data(cfg, tmp_path / "run", CPU_ONE)
    assert data.epoch_size == 16 and next(data.stream)["image"].shape == (8, 3, 16, 16)


@pytest.mark.parametrize(("url", "want"), [
    ("pipe:aws s3 cp s3://bucket/cc/cache-00007.tar -", "pipe:aws s3 cp s3://bucket/cc/cache_meta.json -"),
    ("pipe:curl -s 'https://h/x/shard-1.tar?sig=1'", "pipe:curl -s 'https://h/x/cache_meta.json?sig=1'"),
    ("https://h/x/shard-1.tar", "https://h/x/cache_meta.json"),
    ("/data/c/cache-00001.tar", "/data/c/cache_meta.json"),
])  # fmt: skip
def test_sibling_url(url: str, want: str) -> None:
    assert S.sibling_url(url, "cache_meta.json") == want


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_cache(d: Path, shards: int, per_shard: int, latent: int = 8, channels: int = 4, context: int = 8) -> None:
    """A `dream-fast cache` output written by hand (what build_cache writes, without a VAE)."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = [f"a {c} square on the {p}" for c in ("red", "blue", "green") for p in ("left", "right")]
    tok = BPETokenizer.train(captions, 300, save_path=d / "tokenizer.json")
    n = 0
    for s in range(shards):
        with tarfile.open(d / f"cache-{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(per_shard):
                cap = captions[n % len(captions)]
                members = {"moments.npy": rng.standard_normal((2 * channels, latent, latent)).astype(np.float16),
                           "moments_flip.npy": rng.standard_normal((2 * channels, latent, latent)).astype(np.float16),
                           "ids.npy": tok.encode([cap], context)[0].numpy().astype(np.int32)}
                for ext, arr in members.items():
                    data = _npy(arr)
                    info = tarfile.TarInfo(f"{n:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                n += 1
        (d / f"cache-{s:05d}.json").write_text(json.dumps({"count": per_shard}))
    (d / "cache_meta.json").write_text(json.dumps({"img_size": 16, "vae_channels": channels, "text_context": context,
                                                   "t5_dim": None, "num_shards": shards, "num_samples": n}))


def test_cache_through_pipe_commands_matches_the_local_cache(tmp_path: Path) -> None:
    from dream_fast.data.setup import build_train_data

    _write_cache(tmp_path / "cache", shards=3, per_shard=8)
    pattern = str(tmp_path / "cache" / "cache-{00000..00002}.tar")
    model = {"tokenizer": "vae", "vae_stride": 2, "patch_size": 2, "text_cond": "tower"}

    def batches(shards: str, out: str) -> tuple[list[dict[str, torch.Tensor]], int, Path]:
        cfg = load_config(write_config(tmp_path / f"{out}.yaml", mini_config(
            tmp_path, model=model, data={"source": "cache", "shards": shards, "num_workers": 0, "shuffle_buffer": 0},
            train={"out_dir": str(tmp_path / out)}))).validate()  # fmt: skip
        (tmp_path / out).mkdir()
        data = build_train_data(cfg, tmp_path / out, CPU_ONE)
        return [next(data.stream) for _ in range(3)], data.epoch_size, data.tokenizer_path

    local, n_local, _ = batches(pattern, "local")
    piped, n_piped, tok_path = batches(_pipe(pattern), "piped")
    assert n_local == n_piped == 24
    assert tok_path == tmp_path / "piped" / ".cache_files" / "tokenizer.json"  # fetched with `cat`, stored locally
    assert tok_path.read_bytes() == (tmp_path / "cache" / "tokenizer.json").read_bytes()
    for a, b in zip(local, piped):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_remote_cache_without_its_meta_is_a_clear_error(tmp_path: Path) -> None:
    from dream_fast.train.cache import read_cache_meta

    _write_cache(tmp_path / "cache", shards=1, per_shard=2)
    (tmp_path / "cache" / "cache_meta.json").unlink()
    with pytest.raises(ConfigError, match=r"cache_meta.json.*cat .*cache_meta.json"):
        read_cache_meta(_pipe(str(tmp_path / "cache" / "cache-00000.tar")), tmp_path / "local")
