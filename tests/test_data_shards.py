"""Tests of shard reading (generator shards, hand-built img2dataset shards, broken shards),
rank/worker splitting, shuffling, counting, URL expansion, and the image transforms."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dream_fast.data import shapes as S
from dream_fast.data.bpe import BPETokenizer
from dream_fast.data.shards import (
    ImageTextShards,
    count_samples,
    expand_urls,
    make_loader,
)
from dream_fast.data.transforms import adm_center_crop, caption_grid, hflip, preprocess, to_pil, to_tensor

N_TRAIN, PER_SHARD = 64, 16


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    S.write_shapes_shards(d, N_TRAIN, 8, 8, seed=5, samples_per_shard=PER_SHARD, progress=False)
    return d


def _train_urls(d: Path) -> str:
    return str(d / "train-{00000..00003}.tar")


def _keys(ds: ImageTextShards) -> list[str]:
    return [s["key"] for s in ds]


# --------------------------------------------------------------------------------------------
# Reading generator shards
# --------------------------------------------------------------------------------------------


def test_reads_generator_shards_exactly(shapes_dir: Path) -> None:
    tok = BPETokenizer.train([S.make_sample(5, "train", i)[1] for i in range(64)], 400)
    ds = ImageTextShards(_train_urls(shapes_dir), img_size=32, tokenizer=tok, context=16, shuffle_buffer=0,
                         with_meta=True)  # fmt: skip
    samples = list(ds)
    assert len(samples) == N_TRAIN
    assert ds.stats == {"samples": N_TRAIN, "skipped_samples": 0, "skipped_shards": 0}
    for s in samples[::7]:
        index = int(s["key"][1:])
        img, text, meta = S.make_sample(5, "train", index)
        assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
        assert -1.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert torch.equal(s["image"], to_tensor(img))  # 32 px -> 32 px crop is lossless
        assert s["caption"] == text == s["meta"]["caption"]
        assert s["meta"]["shape_id"] == meta["shape_id"]
        assert torch.equal(s["ids"], tok.encode([text], 16)[0])
    assert [int(s["key"][1:]) for s in samples] == list(range(N_TRAIN))  # no shuffle: file order


def test_resize_on_read(shapes_dir: Path) -> None:
    s = next(iter(ImageTextShards(str(shapes_dir / "val-00000.tar"), img_size=16, shuffle_buffer=0)))
    assert s["image"].shape == (3, 16, 16) and "ids" not in s and "meta" not in s


def test_shuffle_is_deterministic_per_epoch(shapes_dir: Path) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        return _keys(ImageTextShards(_train_urls(shapes_dir), img_size=32, shuffle_buffer=20, seed=seed,
                                     epoch=epoch))  # fmt: skip

    a = order(0, 0)
    assert a == order(0, 0)
    assert sorted(a) == sorted(order(0, 1)) and a != order(0, 1) and a != order(1, 0)
    assert a != sorted(a)


def test_hflip_flips_about_half(shapes_dir: Path) -> None:
    kw = dict(img_size=32, shuffle_buffer=0)
    plain = {s["key"]: s["image"] for s in ImageTextShards(_train_urls(shapes_dir), **kw)}
    flipped = {s["key"]: s["image"] for s in ImageTextShards(_train_urls(shapes_dir), hflip=True, **kw)}
    asym = [k for k in plain if not torch.equal(plain[k], plain[k].flip(-1))]
    assert len(asym) > 40
    assert all(torch.equal(flipped[k], plain[k]) or torch.equal(flipped[k], plain[k].flip(-1)) for k in plain)
    n_flip = sum(torch.equal(flipped[k], plain[k].flip(-1)) for k in asym)
    assert 0.25 * len(asym) < n_flip < 0.75 * len(asym)


def test_resampled_runs_past_the_data_and_stops_when_all_broken(shapes_dir: Path, tmp_path: Path) -> None:
    ds = ImageTextShards(_train_urls(shapes_dir), img_size=32, shuffle_buffer=10, resampled=True)
    assert len(list(itertools.islice(ds, 3 * N_TRAIN))) == 3 * N_TRAIN
    dead = ImageTextShards([str(tmp_path / "missing.tar")], img_size=32, resampled=True)
    assert list(dead) == [] and dead.stats["skipped_shards"] > 0


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3, 4, 6])
def test_rank_split_disjoint_and_complete(shapes_dir: Path, world_size: int) -> None:
    per_rank = []
    for rank in range(world_size):
        ds = ImageTextShards(_train_urls(shapes_dir), img_size=32, shuffle_buffer=8, seed=3, rank=rank,
                             world_size=world_size)  # fmt: skip
        urls, filters = ds.plan()
        if world_size <= 4:  # enough shards: split by shard, nobody reads another's shard
            assert not filters and len(urls) in (4 // world_size, -(-4 // world_size))
        else:
            assert filters == [(world_size, rank)] and len(urls) == 4
        per_rank.append(_keys(ds))
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == N_TRAIN


def test_worker_split_through_dataloader(shapes_dir: Path) -> None:
    """3 ranks x 2 workers over 4 shards: rank 0 splits its 2 shards by worker, ranks 1 and 2
    have 1 shard each and split its samples by index."""
    seen, counted = [], 0
    for rank in range(3):
        ds = ImageTextShards(_train_urls(shapes_dir), img_size=32, shuffle_buffer=4, rank=rank, world_size=3)
        for batch in make_loader(ds, batch_size=5, num_workers=2, drop_last=False):
            assert batch["image"].shape[1:] == (3, 32, 32) and len(batch["caption"]) == len(batch["key"])
            seen.extend(batch["key"])
        # Counted by the worker processes, read here through shared memory.
        assert ds.stats["skipped_samples"] == ds.stats["skipped_shards"] == 0
        assert (ds._counts[:2, 0] > 0).all()  # both workers of every rank read samples
        counted += ds.stats["samples"]
    assert len(seen) == len(set(seen)) == counted == N_TRAIN


def test_bad_rank_is_named(shapes_dir: Path) -> None:
    with pytest.raises(ValueError, match="rank"):
        ImageTextShards(_train_urls(shapes_dir), rank=2, world_size=2)


# --------------------------------------------------------------------------------------------
# Hand-built img2dataset-style shards, broken shards
# --------------------------------------------------------------------------------------------


def _jpg(seed: int, w: int = 40, h: int = 30) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _handmade(path: Path, n: int, start: int = 0, bad: tuple[int, ...] = ()) -> list[tuple[str, bytes]]:
    members = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        members.append((f"{key}.jpg", b"\xff\xd8 not a jpeg" if i in bad else _jpg(i)))
        members.append((f"{key}.txt", f"caption {i}".encode()))
        if i % 2 == 0:  # img2dataset metadata only for some samples
            members.append((f"{key}.json", json.dumps({"key": key, "width": 40}).encode()))
    _tar(path, members)
    return members


def test_handmade_jpg_shards_with_and_without_json(tmp_path: Path) -> None:
    _handmade(tmp_path / "00000.tar", 5)
    _handmade(tmp_path / "00001.tar", 4, start=5)
    # A sample whose caption lives only in its json, and one with no caption at all (skipped).
    _tar(tmp_path / "00002.tar", [("a/x1.webp.jpg", _jpg(1)), ("a/x1.webp.json", b'{"caption": "from json"}'),
                                  ("nocap.png", _jpg(2))])  # fmt: skip
    ds = ImageTextShards(str(tmp_path / "0000{0..2}.tar"), img_size=24, shuffle_buffer=0, with_meta=True)
    got = {s["key"]: s for s in ds}
    assert len(got) == 9 + 0 and ds.stats["skipped_samples"] == 1 + 1  # x1.webp.jpg is not a .jpg ext
    assert got["000000004"]["caption"] == "caption 4" and got["000000004"]["meta"]["width"] == 40
    assert got["000000003"]["meta"] == {}
    assert all(s["image"].shape == (3, 24, 24) for s in got.values())
    assert count_samples(str(tmp_path / "0000{0,1}.tar")) == 9

    _tar(tmp_path / "json_only.tar", [("k1.jpg", _jpg(1)), ("k1.json", b'{"caption": "from json"}')])
    (s,) = list(ImageTextShards(str(tmp_path / "json_only.tar"), img_size=24))
    assert s["caption"] == "from json"


def test_corrupt_and_truncated_shards_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    _handmade(tmp_path / "good.tar", 4, start=100)
    # Corrupt image member (sample 2), then truncated in the middle of sample 5's image.
    _handmade(tmp_path / "bad.tar", 7, bad=(2,))
    with tarfile.open(tmp_path / "bad.tar") as tf:
        cut = tf.getmember("000000005.jpg").offset_data + 10
    (tmp_path / "bad.tar").write_bytes((tmp_path / "bad.tar").read_bytes()[:cut])
    # Cut exactly at a header boundary: tarfile itself would read this as a normal end.
    _handmade(tmp_path / "cut_at_header.tar", 3, start=200)
    with tarfile.open(tmp_path / "cut_at_header.tar") as tf:
        cut = tf.getmember("000000202.jpg").offset
    (tmp_path / "cut_at_header.tar").write_bytes((tmp_path / "cut_at_header.tar").read_bytes()[:cut])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 100)
    urls = [
        str(tmp_path / n) for n in ("good.tar", "bad.tar", "cut_at_header.tar", "garbage.tar", "gone.tar")
    ]
    with caplog.at_level(logging.WARNING, logger="dream_fast.data.shards"):
        ds = ImageTextShards(urls, img_size=16, shuffle_buffer=0)
        keys = _keys(ds)
    # good: 4; bad: 0,1,3,4 (2 corrupt, 5 cut, 6 gone; 4 is kept because 5's header was read);
    # cut_at_header: 200 (201 is dropped at the break: nothing proves it complete).
    assert keys == [f"{i:09d}" for i in (100, 101, 102, 103, 0, 1, 3, 4, 200)]
    assert ds.stats == {"samples": 9, "skipped_samples": 1, "skipped_shards": 4}
    shard_warnings = [r for r in caplog.records if "skipping the rest of shard" in r.getMessage()]
    assert len(shard_warnings) == 4

    # The same in DataLoader workers; skips after the last batch are counted too. Two epochs add up.
    ds2 = ImageTextShards(urls, img_size=16, shuffle_buffer=0)
    for epoch in range(2):
        ds2.set_epoch(epoch)
        n = sum(len(b["key"]) for b in make_loader(ds2, 2, num_workers=2, drop_last=False))
        assert n == 9
    assert ds2.stats == {"samples": 18, "skipped_samples": 2, "skipped_shards": 8}
    ds2.reset_stats()
    assert ds2.stats["samples"] == 0


def test_gzipped_and_pipe_shards(shapes_dir: Path, tmp_path: Path) -> None:
    import gzip

    src = shapes_dir / "val-00000.tar"
    (tmp_path / "v.tar.gz").write_bytes(gzip.compress(src.read_bytes()))
    a = _keys(ImageTextShards(str(src), img_size=32, shuffle_buffer=0))
    assert _keys(ImageTextShards(str(tmp_path / "v.tar.gz"), img_size=32, shuffle_buffer=0)) == a
    assert _keys(ImageTextShards(f"pipe:cat {src}", img_size=32, shuffle_buffer=0)) == a


# --------------------------------------------------------------------------------------------
# Counting and URL expansion
# --------------------------------------------------------------------------------------------


def test_count_samples_manifest_stats_and_scan(shapes_dir: Path, tmp_path: Path) -> None:
    assert count_samples(_train_urls(shapes_dir)) == N_TRAIN
    assert count_samples(str(shapes_dir / "*.tar")) == N_TRAIN + 16
    _handmade(tmp_path / "00000.tar", 3)
    assert count_samples(str(tmp_path / "00000.tar")) == 3
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 1234}))  # img2dataset's
    assert count_samples(str(tmp_path / "00000.tar")) == 1234


def test_expand_urls(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"s-{i}.tar").write_bytes(b"")
    assert expand_urls("d/a-{000..002}.tar") == ["d/a-000.tar", "d/a-001.tar", "d/a-002.tar"]
    assert expand_urls("a.tar,b-{0,1}.tar") == ["a.tar", "b-0.tar", "b-1.tar"]
    assert expand_urls("a.tar::b.tar") == ["a.tar", "b.tar"]
    assert expand_urls(str(tmp_path / "s-*.tar")) == [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    assert expand_urls(["x.tar", "y-{1..2}.tar"]) == ["x.tar", "y-1.tar", "y-2.tar"]
    assert expand_urls("pipe:curl -s http://h/a,b/{0..1}.tar") == [
        "pipe:curl -s http://h/a,b/0.tar",
        "pipe:curl -s http://h/a,b/1.tar",
    ]
    with pytest.raises(ValueError, match="matches no file"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="no shards"):
        expand_urls([])


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def test_adm_center_crop_non_square() -> None:
    arr = np.zeros((50, 200, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:] = (0, 0, 255)
    out = np.asarray(adm_center_crop(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3)
    assert tuple(out[16, 2]) == (255, 0, 0) and tuple(out[16, 29]) == (0, 0, 255)  # the centre kept
    big = adm_center_crop(Image.new("RGB", (1000, 600), (10, 20, 30)), 64)  # box-halving path
    assert big.size == (64, 64) and big.getpixel((5, 60)) == (10, 20, 30)
    assert adm_center_crop(Image.new("L", (20, 70)), 64).size == (64, 64)  # upscale, grey input


def test_flip_to_tensor_to_pil() -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    assert np.array_equal(np.asarray(hflip(img)), arr[:, ::-1])

    class Always:
        def __init__(self, v: float):
            self.v = v

        def random(self) -> float:
            return self.v

    x = preprocess(img, 8, flip=True, rng=Always(0.0))
    assert torch.equal(x, to_tensor(img).flip(-1))
    assert torch.equal(preprocess(img, 8, flip=True, rng=Always(0.9)), to_tensor(img))
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(to_tensor(img))), arr)
    pics = to_pil(torch.stack([to_tensor(img)] * 2))
    assert isinstance(pics, list) and len(pics) == 2
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_pil(torch.zeros(8, 8))


def test_caption_grid_layout() -> None:
    imgs = [S.make_sample(0, "train", i)[0] for i in range(5)]
    caps = [S.make_sample(0, "train", i)[1] for i in range(4)] + ["x" * 300]
    grid = caption_grid(imgs, caps, ncols=3)
    assert grid.width == 3 * (128 + 4) + 4 and grid.height > 2 * 128
    # Caption text is drawn (dark pixels) under the first image, not over it.
    g = np.asarray(grid)
    assert g[4 + 128 + 4 :, 4 : 4 + 128].min() < 100
    with pytest.raises(ValueError, match="one caption per image"):
        caption_grid(imgs, caps[:2])
