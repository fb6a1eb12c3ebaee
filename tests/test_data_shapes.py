"""Tests of the procedural shapes dataset: determinism, held-out split, captions, rendering,
and the reproducible shard writer."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dream_fast.data import shapes as S


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


def _write(d: Path, seed: int = 0, **kw) -> dict:
    args = dict(num_train=40, num_val=10, num_heldout=12, seed=seed, samples_per_shard=16, progress=False)
    args.update(kw)
    return S.write_shapes_shards(d, **args)


def test_same_seed_byte_identical_different_seed_differs(tmp_path: Path) -> None:
    _write(tmp_path / "a", seed=3)
    _write(tmp_path / "b", seed=3)
    _write(tmp_path / "c", seed=4)
    ha, hb, hc = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert set(ha) == {"train-00000.tar", "train-00001.tar", "train-00002.tar", "val-00000.tar",
                       "heldout-00000.tar"}  # fmt: skip
    assert ha == hb
    assert all(ha[k] != hc[k] for k in ha)


def test_sample_depends_only_on_seed_split_index() -> None:
    img1, cap1, meta1 = S.make_sample(7, "train", 123)
    for i in range(5):  # other samples drawn in between must not matter
        S.make_sample(7, "train", i)
    img2, cap2, meta2 = S.make_sample(7, "train", 123)
    assert np.array_equal(np.asarray(img1), np.asarray(img2)) and cap1 == cap2 and meta1 == meta2
    assert S.make_sample(7, "val", 123)[2] != meta1  # the split is part of the seed


def test_rerun_reuses_complete_shards_and_repairs_broken_ones(tmp_path: Path) -> None:
    first = _write(tmp_path)
    assert first["written"] == 5 and first["reused"] == 0
    before = _hashes(tmp_path)
    again = _write(tmp_path)
    assert again["written"] == 0 and again["reused"] == 5
    # Truncate one shard, delete another: exactly those two are rewritten, identically.
    p = tmp_path / "train-00001.tar"
    p.write_bytes(p.read_bytes()[:3000])
    (tmp_path / "val-00000.tar").unlink()
    fixed = _write(tmp_path)
    assert fixed["written"] == 2
    assert _hashes(tmp_path) == before
    # Fewer train samples: the stale third train shard goes away.
    _write(tmp_path, num_train=20)
    assert not (tmp_path / "train-00002.tar").exists()
    with pytest.raises(ValueError, match="other settings"):
        _write(tmp_path, seed=1)
    # Shards from a version that drew other shape sizes (older manifests have no size_frac) are
    # not silently reused for the new sizes.
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["size_frac"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="size_frac"):
        _write(tmp_path, num_train=20)


def test_manifest_and_member_layout(tmp_path: Path) -> None:
    _write(tmp_path, image_format="jpg")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 40, "val": 10, "heldout": 12}
    assert manifest["seed"] == 0 and manifest["img_size"] == 32
    assert [tuple(p) for p in manifest["heldout_combos"]["colour_shape"]] == list(
        S.HELDOUT_COMBOS["colour_shape"]
    )
    assert sum(s["count"] for s in manifest["shards"]["train"]) == 40
    with tarfile.open(tmp_path / "val-00000.tar") as tf:
        names = tf.getnames()
        assert names[:3] == ["100000000.jpg", "100000000.txt", "100000000.json"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tf.getmembers())
        meta = json.loads(tf.extractfile("100000000.json").read())
        text = tf.extractfile("100000000.txt").read().decode()
    assert meta["key"] == "100000000" and meta["caption"] == text
    for k in ("shape_id", "colour_id", "position_id", "size_id", "background_id"):
        assert isinstance(meta[k], int)
    assert S.shard_pattern(tmp_path, "val") == [str(tmp_path / "val-00000.tar")]


def _triples(attrs: S.ImageAttrs) -> list[tuple[int, int, int]]:
    return [(sh.shape_id, sh.colour_id, sh.position_id) for sh in attrs.shapes]


@pytest.mark.parametrize("max_shapes", [1, 3])
def test_heldout_combos_never_in_train_or_val(max_shapes: int) -> None:
    seen_cs = set()
    for split in ("train", "val"):
        for i in range(2000):
            a = S.sample_attributes(S.sample_rng(0, split, i), split, max_shapes)
            for s, c, p in _triples(a):
                assert not S.is_heldout(s, c, p), (split, i, a)
                seen_cs.add((c, s))
    # Every colour-shape pairing that is not held out does occur.
    assert len(seen_cs) == len(S.COLOURS) * len(S.SHAPES) - len(S.HELDOUT_COMBOS["colour_shape"])


def test_heldout_split_only_heldout_and_covers_all_combos() -> None:
    cs, sp = set(), set()
    for i in range(1500):
        a = S.sample_attributes(S.sample_rng(0, "heldout", i), "heldout")
        (s, c, p), = _triples(a)  # fmt: skip
        assert S.is_heldout(s, c, p)
        cs.add((S.SPEC.colours[c], S.SPEC.shapes[s]))
        sp.add((S.SPEC.shapes[s], S.SPEC.positions[p]))
    assert set(S.HELDOUT_COMBOS["colour_shape"]) <= cs
    assert set(S.HELDOUT_COMBOS["shape_position"]) <= sp


def test_written_shards_respect_split(tmp_path: Path) -> None:
    _write(tmp_path, num_train=60, num_val=0, num_heldout=20)
    for name, expect in (("train-00000.tar", False), ("heldout-00000.tar", True)):
        with tarfile.open(tmp_path / name) as tf:
            metas = [
                json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")
            ]
        assert metas and all(m["heldout"] is expect for m in metas)
        for m in metas:
            assert S.is_heldout(m["shape_id"], m["colour_id"], m["position_id"]) is expect


def test_caption_names_every_attribute_and_background_differs() -> None:
    for i in range(300):
        attrs = S.sample_attributes(S.sample_rng(1, "train", i), "train", max_shapes=3)
        text = S.caption(attrs)
        assert text.endswith(f"on a {attrs.background} background")
        assert text.count(" and ") == len(attrs.shapes) - 1
        for sh in attrs.shapes:
            assert f"a {sh.size} {sh.colour} {sh.shape} " in text
            assert sh.position in text
            assert sh.colour != attrs.background
        assert len({sh.position_id for sh in attrs.shapes}) == len(attrs.shapes)
    assert S.caption(S.ImageAttrs((S.ShapeAttrs(0, 0, 0, 0),), 0)) == (
        "a small red circle in the top left on a gray background"
    )


def test_render_puts_the_shape_in_its_cell() -> None:
    size = 48
    for i in range(60):
        img, _, meta = S.make_sample(2, "val", i, img_size=size)
        arr = np.asarray(img)
        assert arr.shape == (size, size, 3) and arr.dtype == np.uint8
        sh = meta["shapes"][0]
        x0, y0, x1, y1 = S._shape_box(S.attrs_from_meta(meta).shapes[0], size)
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2 + (y1 - y0) / 6)  # inside triangles too
        assert tuple(arr[cy, cx]) == S.COLOURS[sh["colour"]]
        row, col = divmod(sh["position_id"], 3)
        other = (sh["position_id"] + 4) % 9  # a cell the single shape does not touch
        orow, ocol = divmod(other, 3)
        px = arr[int((orow + 0.5) * size / 3), int((ocol + 0.5) * size / 3)]
        assert tuple(px) == S.BACKGROUNDS[meta["background"]]
        # Anti-aliasing: edge pixels blend shape and background.
        assert len({tuple(p) for p in arr.reshape(-1, 3)}) > 2
        assert np.array_equal(np.asarray(S.render(S.attrs_from_meta(meta), size)), arr)


def test_every_shape_stays_whole_on_the_canvas_and_centred_in_its_cell() -> None:
    side = 32.0
    for position_id in range(9):
        row, col = divmod(position_id, 3)
        for size_id in range(len(S.SIZES)):
            for jx, jy in ((-1.0, -1.0), (0.0, 0.0), (1.0, 1.0)):
                sh = S.ShapeAttrs(0, 0, position_id, size_id, jx, jy)
                x0, y0, x1, y1 = S._shape_box(sh, side)
                assert 0.0 <= x0 and 0.0 <= y0 and x1 <= side and y1 <= side, (position_id, size_id)
                assert x1 - x0 == pytest.approx(S.SIZE_FRAC[sh.size] * side)
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                assert col * side / 3 <= cx <= (col + 1) * side / 3
                assert row * side / 3 <= cy <= (row + 1) * side / 3


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="split"):
        S.make_sample(0, "test", 0)
    with pytest.raises(ValueError, match="max_shapes"):
        S.sample_attributes(np.random.default_rng(0), "train", max_shapes=0)
    with pytest.raises(ValueError, match="image_format"):
        S.write_shapes_shards("/nonexistent-never-written", 1, 1, 1, image_format="gif")
