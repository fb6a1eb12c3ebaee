"""Shapes-domain attribute oracle: reads shape, colour, position, size and background off an image.

Rule-based (no weights, no training): background from the border, the shape as soft coverage
against it, and shape from image moments (skew = triangle, diagonal vs axis kurtosis = square).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from dream_fast.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    SIZE_FRAC,
    SPEC,
    SPLITS,
    attrs_meta,
    caption,
    is_heldout,
    sample_attributes,
    sample_rng,
)

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "position", "size", "background")
ORACLE_SIZE = 32  # images are read at this side (the shapes data's native size)
FEATURE_NAMES: tuple[str, ...] = (
    "bg_r",
    "bg_g",
    "bg_b",
    "fg_r",
    "fg_g",
    "fg_b",
    "cx",
    "cy",
    "extent",
    "sqrt_area",
    "skew_x",
    "skew_y",
    "kurt_diag_minus_axis",
    "aspect",
)

_COLOUR_RGB = np.array([COLOURS[c] for c in SPEC.colours], dtype=np.float64)
_BG_RGB = np.array([BACKGROUNDS[b] for b in SPEC.backgrounds], dtype=np.float64)
# Area of each shape relative to its bounding box (square, circle, triangle): turns the area
# into the side length the renderer used, which tells "small" from "large" for every shape.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
# Thresholds from the continuous shapes: a triangle's vertical skew is -0.57 (circle/square 0);
# kurtosis along the diagonal minus along the axes is +0.6 for a square and 0 for a circle.
_SKEW_TRIANGLE = 0.28
_KURT_SQUARE = 0.3
_SIZE_SPLIT = (SIZE_FRAC["small"] + SIZE_FRAC["large"]) / 2  # side / image side between the size classes


@dataclass
class OracleReading:
    """What the oracle read off one image: attribute ids into SPEC and its feature vector."""

    shape_id: int
    colour_id: int
    position_id: int
    size_id: int
    background_id: int
    features: np.ndarray  # (len(FEATURE_NAMES),) float64
    found: bool  # False when no shape stands out from the background

    def ids(self) -> dict[str, int]:
        return {f"{a}_id": getattr(self, f"{a}_id") for a in ATTRIBUTES}


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255] at ORACLE_SIZE."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"oracle expects an RGB (H, W, 3) array, got shape {image.shape}")
        image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    img = image.convert("RGB")
    if img.size != (ORACLE_SIZE, ORACLE_SIZE):
        # BOX keeps the anti-aliased coverage meaning of pixels when downsampling a larger render.
        img = img.resize((ORACLE_SIZE, ORACLE_SIZE), Image.BOX if img.width > ORACLE_SIZE else Image.BILINEAR)
    return np.asarray(img, dtype=np.float64)


def _moments(w_HW: np.ndarray) -> tuple[float, float, float, float, float, float, float, float]:
    """(mass, cx, cy, var_x, var_y, skew_x, skew_y, kurt_diag - kurt_axis) of a weight map.

    Each pixel's weight is spread uniformly over its square (exact for box-filtered renders),
    which adds 1/12 to the variances.
    """
    H, W = w_HW.shape
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    m = w_HW.sum()
    cx, cy = (w_HW * xs).sum() / m, (w_HW * ys).sum() / m
    dx, dy = xs - cx, ys - cy

    def central(u: np.ndarray, k: int) -> float:
        return float((w_HW * u**k).sum() / m)

    vx, vy = central(dx, 2) + 1 / 12, central(dy, 2) + 1 / 12
    skx, sky = central(dx, 3) / vx**1.5, central(dy, 3) / vy**1.5
    # 4th moment of a uniform pixel square adds 6 v u2 + 1/80 per axis; small next to the shape.
    kurt_axis = 0.5 * (
        (central(dx, 4) + 0.5 * vx + 1 / 80) / vx**2 + (central(dy, 4) + 0.5 * vy + 1 / 80) / vy**2
    )
    d1, d2 = (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)
    v1, v2 = central(d1, 2) + 1 / 12, central(d2, 2) + 1 / 12
    kurt_diag = 0.5 * ((central(d1, 4) + 0.5 * v1) / v1**2 + (central(d2, 4) + 0.5 * v2) / v2**2)
    return m, cx, cy, vx, vy, skx, sky, kurt_diag - kurt_axis


def read_image(image: Image.Image | np.ndarray) -> OracleReading:
    """Read the attributes of the (single, dominant) shape of one image."""
    x = _as_array(image)
    H, W, _ = x.shape
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist_HW = np.linalg.norm(x - bg, axis=-1)
    peak = dist_HW.max()
    bg_id = int(np.argmin(np.linalg.norm(_BG_RGB - bg, axis=1)))
    if peak < 30.0:  # nothing stands out: report the background, guess the rest
        feats = np.concatenate([bg / 255, bg / 255, [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
        return OracleReading(0, 0, 4, 0, bg_id, feats, False)

    # The shape's own colour: the pixels that stand out most (its fully covered interior).
    core = dist_HW >= 0.8 * peak
    fg = np.median(x[core], axis=0)
    colour_id = int(np.argmin(np.linalg.norm(_COLOUR_RGB - fg, axis=1)))

    # Soft coverage: where each pixel sits between background and shape colour.
    axis = fg - bg
    alpha_HW = np.clip(((x - bg) @ axis) / (axis @ axis), 0.0, 1.0)
    # Keep the largest blob (and its anti-aliased rim), so stray noise elsewhere is ignored.
    labels, n = ndimage.label(alpha_HW > 0.5, structure=np.ones((3, 3)))
    if n == 0:
        labels, n = ndimage.label(core, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(np.ones_like(alpha_HW), labels, index=np.arange(1, n + 1))
    blob = labels == (1 + int(np.argmax(sizes)))
    region = ndimage.binary_dilation(blob, structure=np.ones((3, 3)))
    w_HW = alpha_HW * region

    m, cx, cy, vx, vy, skx, sky, kurt = _moments(w_HW)
    if abs(sky) > _SKEW_TRIANGLE:
        shape = "triangle"
    elif kurt > _KURT_SQUARE:
        shape = "square"
    else:
        shape = "circle"
    side = np.sqrt(m / _FILL[shape]) / W
    size_id = int(side > _SIZE_SPLIT)
    col = min(int(cx / (W / 3)), 2)
    row = min(int(cy / (H / 3)), 2)
    feats = np.concatenate(
        [
            bg / 255,
            fg / 255,
            [cx / W, cy / H, side, np.sqrt(m) / W, skx, sky, kurt, np.sqrt(vy / vx)],
        ]
    )
    return OracleReading(SPEC.shapes.index(shape), colour_id, 3 * row + col, size_id, bg_id, feats, True)


def read_images(images: Sequence[Image.Image | np.ndarray]) -> list[OracleReading]:
    return [read_image(im) for im in images]


def oracle_features(images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    """(N, len(FEATURE_NAMES)) oracle feature vectors: the space `shapes_fd` compares in."""
    return np.stack([r.features for r in read_images(images)])


# --------------------------------------------------------------------------------------------
# Accuracy against metas
# --------------------------------------------------------------------------------------------


def _truth(meta: dict[str, Any]) -> dict[str, int]:
    try:
        return {f"{a}_id": int(meta[f"{a}_id"]) for a in ATTRIBUTES}
    except KeyError as e:
        raise ValueError(
            f"meta is missing {e.args[0]!r}; expected a shapes meta (make_sample / shapes_eval_prompts) with "
            f"{[f'{a}_id' for a in ATTRIBUTES]}"
        ) from None


def _meta_heldout(meta: dict[str, Any]) -> bool:
    if "heldout" in meta:
        return bool(meta["heldout"])
    return is_heldout(int(meta["shape_id"]), int(meta["colour_id"]), int(meta["position_id"]))


def _summarise(correct_NA: np.ndarray) -> dict[str, Any]:
    n = int(correct_NA.shape[0])
    out: dict[str, Any] = {"n": n}
    for j, a in enumerate(ATTRIBUTES):
        out[a] = float(correct_NA[:, j].mean()) if n else float("nan")
    # "all" = every attribute the prompt names (background included) read correctly.
    out["all"] = float(correct_NA.all(axis=1).mean()) if n else float("nan")
    # 95% Wilson interval for the all-attributes accuracy, for comparing runs honestly.
    out["all_ci95"] = list(wilson_interval(int(correct_NA.all(axis=1).sum()), n)) if n else [float("nan")] * 2
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def oracle_accuracy(
    images: Sequence[Image.Image | np.ndarray], metas: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Per-attribute and all-attributes accuracy of the oracle's reading against the metas.

    Returns {"n", "shape", "colour", "position", "size", "background", "all", "all_ci95"} with
    accuracies in [0, 1]. Only the first shape of a meta is compared (the shapes data has one
    shape per image by default).
    """
    if len(images) != len(metas):
        raise ValueError(
            f"oracle_accuracy needs one meta per image, got {len(images)} images, {len(metas)} metas"
        )
    return _summarise(_correct(read_images(images), metas))


def _correct(readings: Sequence[OracleReading], metas: Sequence[dict[str, Any]]) -> np.ndarray:
    rows = []
    for r, meta in zip(readings, metas):
        t, got = _truth(meta), r.ids()
        rows.append([got[f"{a}_id"] == t[f"{a}_id"] for a in ATTRIBUTES])
    return np.array(rows, dtype=bool).reshape(len(rows), len(ATTRIBUTES))


def oracle_report(
    images: Sequence[Image.Image | np.ndarray], metas: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """oracle_accuracy over all images and split into seen vs held-out combinations:
    {"overall": {...}, "seen": {...}, "heldout": {...}} (a part with no image has n = 0)."""
    if len(images) != len(metas):
        raise ValueError(
            f"oracle_report needs one meta per image, got {len(images)} images, {len(metas)} metas"
        )
    correct = _correct(read_images(images), metas)
    held = np.array([_meta_heldout(m) for m in metas], dtype=bool)
    return {
        "overall": _summarise(correct),
        "seen": _summarise(correct[~held]),
        "heldout": _summarise(correct[held]),
    }


# --------------------------------------------------------------------------------------------
# Fréchet distance in the oracle's feature space, and evaluation prompts
# --------------------------------------------------------------------------------------------


def shapes_fd(
    images_a: Sequence[Image.Image | np.ndarray], images_b: Sequence[Image.Image | np.ndarray]
) -> float:
    """Fréchet distance between the oracle feature distributions (FEATURE_NAMES) of two image sets.

    A domain-specific FID: it sees background/shape colours, placement, size and shape moments,
    so it measures how far generated images drift from the renderer's distribution.
    """
    from dream_fast.eval.fid import feature_stats, frechet_distance

    if len(images_a) < 2 or len(images_b) < 2:
        raise ValueError(f"shapes_fd needs >= 2 images per set, got {len(images_a)} and {len(images_b)}")
    mu_a, s_a = feature_stats(oracle_features(images_a))
    mu_b, s_b = feature_stats(oracle_features(images_b))
    return frechet_distance(mu_a, s_a, mu_b, s_b)


def shapes_eval_prompts(n: int, split: str = "val", seed: int = 1234) -> list[tuple[str, dict[str, Any]]]:
    """n (caption, meta) pairs of `split` ("val" = seen combinations, "heldout", or "train"),
    drawn exactly like the shapes data (same captions and metas as make_sample) without rendering."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = []
    for i in range(n):
        attrs = sample_attributes(sample_rng(seed, split, i), split)
        meta = attrs_meta(attrs)
        text = caption(attrs)
        meta.update(caption=text, split=split, index=i)
        out.append((text, meta))
    return out
