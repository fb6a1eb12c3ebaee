"""Procedural captioned-shapes dataset: the embedded default that needs no downloads.

Deterministic attribute sampling, anti-aliased rendering, captions, a held-out split of attribute
combinations, and a writer of reproducible img2dataset-layout webdataset shards.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from dream_fast.data.transforms import Image, ImageDraw  # PIL, imported on first use

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "heldout")

# Shape colours sit far from each other and from the backgrounds in RGB, so an oracle that reads
# the pixels of a shape can name its colour without ambiguity.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 235),
    "yellow": (245, 225, 30),
    "purple": (145, 50, 200),
    "orange": (250, 135, 20),
    "cyan": (30, 215, 225),
    "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "black": (12, 12, 12),
    "white": (250, 250, 250),
    "navy": (20, 28, 80),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
SIZES: tuple[str, ...] = ("small", "large")

# Phrase used in captions for each grid cell ("in the top left", "at the top", "on the left").
_POSITION_PHRASE: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

# Attribute combinations that never occur in "train" or "val" and make up the "heldout" split:
# an image is held out when any of its shapes has a listed (colour, shape) or (shape, position)
# pair. Every shape and colour still appears in training, only these pairings do not.
HELDOUT_COMBOS: dict[str, tuple[tuple[str, str], ...]] = {
    "colour_shape": (
        ("red", "triangle"),
        ("green", "square"),
        ("blue", "circle"),
        ("orange", "triangle"),
    ),
    "shape_position": (
        ("circle", "bottom right"),
        ("square", "top left"),
    ),
}

# Shape side (bounding box) as a fraction of the image side, per size class. At 32 px with 4-px
# tokens the outline of a shape lives inside the tokens it covers partly, so the sizes decide how much
# of the shape a model that draws whole tokens can show. Each token of 400 real val images replaced
# by its mean colour, the oracle reads the shape on: 0.20/0.32 (6.4/10.2 px): 32% (small) and 71%
# (large); 0.26/0.34: 47.5% and 79% (63% in all); 0.32/0.42 (10.2/13.4 px): 69% and 85% (77%).
# A large shape is wider than its grid cell (1/3 of the side): _shape_box keeps it on the canvas, and
# in multi-shape scenes shapes in adjacent cells may touch.
# Read-only: the shard manifest records these, so a change must come from this line, not a mutation.
SIZE_FRAC: Mapping[str, float] = MappingProxyType({"small": 0.32, "large": 0.42})
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges


@dataclass(frozen=True)
class ShapesSpec:
    """The attribute vocabularies of the shapes domain (ids are indices into these lists)."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    positions: tuple[str, ...] = POSITIONS
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    colour_rgb: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(COLOURS))
    background_rgb: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(BACKGROUNDS))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


SPEC = ShapesSpec()


@dataclass(frozen=True)
class ShapeAttrs:
    """One shape: attribute ids into SPEC plus a jitter of its centre inside its grid cell.

    jitter_x/jitter_y in [-1, 1] are fractions of the free room left in the cell, rounded to
    4 decimals so that the json meta reproduces the rendering exactly.
    """

    shape_id: int
    colour_id: int
    position_id: int
    size_id: int
    jitter_x: float = 0.0
    jitter_y: float = 0.0

    @property
    def shape(self) -> str:
        return SPEC.shapes[self.shape_id]

    @property
    def colour(self) -> str:
        return SPEC.colours[self.colour_id]

    @property
    def position(self) -> str:
        return SPEC.positions[self.position_id]

    @property
    def size(self) -> str:
        return SPEC.sizes[self.size_id]


@dataclass(frozen=True)
class ImageAttrs:
    """Everything that determines one image: its shapes (distinct grid cells) and background."""

    shapes: tuple[ShapeAttrs, ...]
    background_id: int

    @property
    def background(self) -> str:
        return SPEC.backgrounds[self.background_id]


# --------------------------------------------------------------------------------------------
# Held-out combinations and attribute sampling
# --------------------------------------------------------------------------------------------

_HELD_CS = {(SPEC.colours.index(c), SPEC.shapes.index(s)) for c, s in HELDOUT_COMBOS["colour_shape"]}
_HELD_SP = {(SPEC.shapes.index(s), SPEC.positions.index(p)) for s, p in HELDOUT_COMBOS["shape_position"]}


def is_heldout(shape_id: int, colour_id: int, position_id: int) -> bool:
    """True when this (shape, colour, position) triple contains a held-out pairing."""
    return (colour_id, shape_id) in _HELD_CS or (shape_id, position_id) in _HELD_SP


# All (shape, colour, position) triples, split once into seen and held-out lists so that both
# splits sample their triples uniformly.
_ALL_TRIPLES = [
    (s, c, p)
    for s in range(len(SPEC.shapes))
    for c in range(len(SPEC.colours))
    for p in range(len(SPEC.positions))
]
_SEEN_TRIPLES = np.array([t for t in _ALL_TRIPLES if not is_heldout(*t)], dtype=np.int64)
_HELD_TRIPLES = np.array([t for t in _ALL_TRIPLES if is_heldout(*t)], dtype=np.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _pick_triple(rng: np.random.Generator, pool: np.ndarray, used_positions: set[int]) -> tuple[int, ...]:
    ok = pool[~np.isin(pool[:, 2], list(used_positions))] if used_positions else pool
    return tuple(int(v) for v in ok[rng.integers(len(ok))])


def sample_attributes(rng: np.random.Generator, split: str, max_shapes: int = 1) -> ImageAttrs:
    """Draw the attributes of one image of `split` ("train", "val" or "heldout").

    train/val: every shape avoids the held-out pairings. heldout: the first shape carries a
    held-out pairing (uniform over the held-out triples), any further shape is a seen one.
    The number of shapes is uniform in 1..max_shapes; shapes occupy distinct grid cells and
    the background differs (by name) from every shape colour.
    """
    _check_split(split)
    if not 1 <= max_shapes <= len(SPEC.positions):
        raise ValueError(f"max_shapes must be in 1..{len(SPEC.positions)}, got {max_shapes}")
    n = 1 if max_shapes == 1 else int(rng.integers(1, max_shapes + 1))
    shapes: list[ShapeAttrs] = []
    used: set[int] = set()
    for k in range(n):
        pool = _HELD_TRIPLES if (split == "heldout" and k == 0) else _SEEN_TRIPLES
        s, c, p = _pick_triple(rng, pool, used)
        used.add(p)
        size = int(rng.integers(len(SPEC.sizes)))
        jx, jy = (round(float(v), 4) for v in rng.uniform(-1.0, 1.0, size=2))
        shapes.append(ShapeAttrs(s, c, p, size, jx, jy))
    colour_names = {sh.colour for sh in shapes}
    allowed_bg = [i for i, b in enumerate(SPEC.backgrounds) if b not in colour_names]
    bg = allowed_bg[int(rng.integers(len(allowed_bg)))]
    return ImageAttrs(tuple(shapes), bg)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample `index` of `split`: depends only on (seed, split, index)."""
    _check_split(split)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


# --------------------------------------------------------------------------------------------
# Rendering and captions
# --------------------------------------------------------------------------------------------


def _shape_box(sh: ShapeAttrs, side: float) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of a shape on a canvas of `side` pixels."""
    cell = side / 3.0
    row, col = divmod(sh.position_id, 3)
    extent = SIZE_FRAC[sh.size] * side
    room = max(cell - extent, 0.0) / 2.0  # how far the centre may move and stay in the cell
    h = extent / 2.0
    # A shape wider than its cell is moved inwards just enough to stay whole on the canvas.
    cx = min(max((col + 0.5) * cell + sh.jitter_x * room, h), side - h)
    cy = min(max((row + 0.5) * cell + sh.jitter_y * room, h), side - h)
    return cx - h, cy - h, cx + h, cy + h


def render(attrs: ImageAttrs, img_size: int = 32) -> Image.Image:
    """RGB image of `attrs` at img_size x img_size, drawn at 4x and box-downsampled."""
    if img_size < 8:
        raise ValueError(f"img_size must be >= 8 pixels, got {img_size}")
    big = img_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), SPEC.background_rgb[attrs.background])
    draw = ImageDraw.Draw(img)
    for sh in attrs.shapes:
        x0, y0, x1, y1 = _shape_box(sh, big)
        fill = SPEC.colour_rgb[sh.colour]
        if sh.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif sh.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle pointing up, filling the same box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((img_size, img_size), Image.BOX)


def caption(attrs: ImageAttrs) -> str:
    """E.g. "a small red circle in the top left on a gray background"; shapes joined by "and"."""
    parts = [f"a {sh.size} {sh.colour} {sh.shape} {_POSITION_PHRASE[sh.position]}" for sh in attrs.shapes]
    return " and ".join(parts) + f" on a {attrs.background} background"


_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


def scene_key(text: str) -> str:
    """The caption with its shape words blanked: two captions with the same key differ only in shape."""
    return _SHAPE_WORD.sub("_", text)


def attrs_meta(attrs: ImageAttrs) -> dict[str, Any]:
    """JSON-able labels: names and integer ids of the first shape at top level, all shapes in
    "shapes", the background, and whether the image is a held-out combination."""
    shapes = [
        {
            "shape": sh.shape,
            "colour": sh.colour,
            "position": sh.position,
            "size": sh.size,
            "shape_id": sh.shape_id,
            "colour_id": sh.colour_id,
            "position_id": sh.position_id,
            "size_id": sh.size_id,
            "jitter_x": sh.jitter_x,
            "jitter_y": sh.jitter_y,
        }
        for sh in attrs.shapes
    ]
    first = {k: v for k, v in shapes[0].items() if not k.startswith("jitter")}
    return {
        **first,
        "background": attrs.background,
        "background_id": attrs.background_id,
        "num_shapes": len(shapes),
        "heldout": any(is_heldout(sh.shape_id, sh.colour_id, sh.position_id) for sh in attrs.shapes),
        "shapes": shapes,
    }


def attrs_from_meta(meta: dict[str, Any]) -> ImageAttrs:
    """Inverse of attrs_meta: rebuild the attributes (and so the exact image) from a json meta."""
    shapes = tuple(
        ShapeAttrs(
            s["shape_id"], s["colour_id"], s["position_id"], s["size_id"], s["jitter_x"], s["jitter_y"]
        )
        for s in meta["shapes"]
    )
    return ImageAttrs(shapes, meta["background_id"])


def make_sample(
    seed: int, split: str, index: int, img_size: int = 32, max_shapes: int = 1
) -> tuple[Image.Image, str, dict[str, Any]]:
    """(image, caption, meta) of sample `index` of `split`; a pure function of its arguments."""
    attrs = sample_attributes(sample_rng(seed, split, index), split, max_shapes)
    meta = attrs_meta(attrs)
    text = caption(attrs)
    meta.update(caption=text, split=split, index=index)
    return render(attrs, img_size), text, meta


# --------------------------------------------------------------------------------------------
# Shard writer
# --------------------------------------------------------------------------------------------


def _key(split: str, index: int) -> str:
    # Keys are unique across splits so that shards of different splits can be mixed freely.
    return f"{SPLITS.index(split)}{index:08d}"


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: same inputs -> byte-identical tar files
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _encode_image(img: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _count_txt_members(path: Path) -> int | None:
    """Number of .txt members, or None when the file is not a readable tar."""
    try:
        with tarfile.open(path, "r:") as tf:
            return sum(1 for m in tf.getmembers() if m.name.endswith(".txt"))
    except (tarfile.TarError, OSError, EOFError):
        return None


def _write_shard(path: Path, split: str, start: int, stop: int, seed: int, img_size: int,
                 image_format: str, max_shapes: int, pbar: Any) -> None:  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(start, stop):
                img, text, meta = make_sample(seed, split, i, img_size, max_shapes)
                key = _key(split, i)
                meta["key"] = key
                _add_member(tf, f"{key}.{image_format}", _encode_image(img, image_format))
                _add_member(tf, f"{key}.txt", text.encode("utf-8"))
                _add_member(tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                if pbar is not None:
                    pbar.update(1)
        os.replace(tmp, path)  # atomic: a shard under its final name is always complete
    finally:
        if tmp.exists():
            tmp.unlink()


def write_shapes_shards(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    num_heldout: int,
    seed: int = 0,
    img_size: int = 32,
    samples_per_shard: int = 5000,
    image_format: str = "png",
    progress: bool = True,
    max_shapes: int = 1,
) -> dict[str, Any]:
    """Write `{split}-{shard:05d}.tar` shards (members {key}.png|jpg, .txt, .json) and manifest.json.

    Shards already present with the expected sample count are reused; each shard is written
    under a temporary name and renamed, so an interrupted run never leaves a partial shard.
    Stale shards of a split beyond the new shard count are removed. Returns the manifest, with
    "written" and "reused" shard counts added. Raises ValueError when out_dir holds shards made
    with different seed/img_size/format/shard size/max_shapes/shape sizes (use another out_dir).
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    counts = {"train": num_train, "val": num_val, "heldout": num_heldout}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"num_{split} must be >= 0, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(seed=seed, img_size=img_size, image_format=image_format,
                  samples_per_shard=samples_per_shard, max_shapes=max_shapes,
                  size_frac=dict(SIZE_FRAC))  # fmt: skip
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
        if diff:
            raise ValueError(
                f"{out} holds shapes shards made with other settings {diff} (old, new); "
                "write to another out_dir or delete the old shards"
            )

    plan: list[tuple[str, int, int, Path]] = []
    for split, n in counts.items():
        num_shards = -(-n // samples_per_shard)
        for s in range(num_shards):
            start, stop = s * samples_per_shard, min((s + 1) * samples_per_shard, n)
            plan.append((split, start, stop, out / f"{split}-{s:05d}.tar"))
        pattern = re.compile(rf"{split}-(\d{{5}})\.tar")
        for p in out.glob(f"{split}-*.tar"):
            m = pattern.fullmatch(p.name)
            if m and int(m.group(1)) >= num_shards:
                p.unlink()

    todo = [t for t in plan if _count_txt_members(t[3]) != t[2] - t[1]]
    pbar = None
    if progress and todo:
        from tqdm.auto import tqdm

        pbar = tqdm(total=sum(t[2] - t[1] for t in todo), desc=f"shapes -> {out}", unit="img")
    try:
        for split, start, stop, path in todo:
            _write_shard(path, split, start, stop, seed, img_size, image_format, max_shapes, pbar)
    finally:
        if pbar is not None:
            pbar.close()

    shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for split, start, stop, path in plan:
        shards[split].append({"name": path.name, "count": stop - start})
    manifest = {
        **params,
        "counts": counts,
        "heldout_combos": {k: [list(p) for p in v] for k, v in HELDOUT_COMBOS.items()},
        "spec": SPEC.to_dict(),
        "key_format": "split digit (train 0, val 1, heldout 2) + 8-digit index",
        "shards": shards,
    }
    tmp = manifest_path.with_name(f".manifest.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, manifest_path)
    log.info("shapes shards in %s: %d written, %d reused", out, len(todo), len(plan) - len(todo))
    return {**manifest, "written": len(todo), "reused": len(plan) - len(todo)}


def shard_pattern(out_dir: str | os.PathLike, split: str) -> list[str]:
    """Paths of the shards of `split` listed in out_dir/manifest.json (for ImageTextShards)."""
    _check_split(split)
    manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    return [str(Path(out_dir) / s["name"]) for s in manifest["shards"][split]]
