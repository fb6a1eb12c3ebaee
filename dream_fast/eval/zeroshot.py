"""Zero-shot classification with the model's own towers: class prompts -> text embeddings.

Each class is the normalised mean of its prompts' normalised text embeddings; an image takes
the class of highest cosine with its normalised image embedding (all tokens visible).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dream_fast.eval.features import extract, text_embeddings

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a {}.",
    "a photo of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
)

# Shapes-meta label keys and the attribute vocabularies they index.
SHAPES_LABEL_KEYS: tuple[str, ...] = ("shape_id", "colour_id", "position_id", "size_id", "background_id")


def prompts_from_templates(
    class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> list[list[str]]:
    """[[template.format(name) for template] for name]; every template needs one "{}"."""
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"templates need exactly one '{{}}' for the class name, got {bad[:3]}")
    return [[t.format(c) for t in templates] for c in class_names]


def shapes_class_prompts(
    label_key: str = "shape_id", per_class: int = 64, seed: int = 0
) -> tuple[list[str], list[list[str]]]:
    """(class names, prompts per class) for a shapes attribute: captions in the data's own grammar
    in which that attribute takes the class value and every other attribute varies at random."""
    from dream_fast.data.shapes import SPEC, ImageAttrs, ShapeAttrs, caption

    key = label_key if label_key.endswith("_id") else f"{label_key}_id"
    if key not in SHAPES_LABEL_KEYS:
        raise ValueError(f"label_key must be one of {SHAPES_LABEL_KEYS}, got {label_key!r}")
    attr = key[: -len("_id")]
    vocab = {
        "shape": SPEC.shapes,
        "colour": SPEC.colours,
        "position": SPEC.positions,
        "size": SPEC.sizes,
        "background": SPEC.backgrounds,
    }[attr]
    rng = np.random.default_rng(seed)
    prompts: list[list[str]] = []
    for v in range(len(vocab)):
        rows = []
        while len(rows) < per_class:
            ids = {
                "shape": int(rng.integers(len(SPEC.shapes))),
                "colour": int(rng.integers(len(SPEC.colours))),
                "position": int(rng.integers(len(SPEC.positions))),
                "size": int(rng.integers(len(SPEC.sizes))),
                "background": int(rng.integers(len(SPEC.backgrounds))),
            }
            ids[attr] = v
            if SPEC.colours[ids["colour"]] == SPEC.backgrounds[ids["background"]]:
                continue  # the data never draws a shape in its background's colour
            sh = ShapeAttrs(ids["shape"], ids["colour"], ids["position"], ids["size"])
            rows.append(caption(ImageAttrs((sh,), ids["background"])))
        prompts.append(rows)
    return list(vocab), prompts


def class_text_embeddings(
    model: nn.Module, tokenizer: Any, class_prompts: Sequence[Sequence[str]]
) -> torch.Tensor:
    """(K, E): per class, the normalised mean of its prompts' normalised text embeddings."""
    if not class_prompts or any(len(p) == 0 for p in class_prompts):
        raise ValueError("every class needs at least one prompt")
    flat = [t for p in class_prompts for t in p]
    emb = text_embeddings(model, tokenizer, flat)
    out, i = [], 0
    for p in class_prompts:
        out.append(emb[i : i + len(p)].mean(dim=0))
        i += len(p)
    return F.normalize(torch.stack(out), dim=-1)


def zero_shot_from_embeddings(
    image_emb_NE: torch.Tensor,
    class_emb_KE: torch.Tensor,
    labels_N: torch.Tensor,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy of argmax cosine over classes. Returns {"top1", "top5", "per_class", "n",
    "predictions" (list of class indices)}; accuracies are fractions."""
    img = F.normalize(image_emb_NE.float(), dim=-1)
    cls = F.normalize(class_emb_KE.float(), dim=-1)
    y = torch.as_tensor(labels_N, dtype=torch.long)
    if img.shape[0] != y.shape[0]:
        raise ValueError(f"one label per image needed, got {img.shape[0]} images, {y.shape[0]} labels")
    K = cls.shape[0]
    if y.numel() and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"labels must index the {K} classes, got range [{int(y.min())}, {int(y.max())}]")
    sims = img @ cls.T
    pred = sims.argmax(dim=1)
    top5 = sims.topk(min(5, K), dim=1).indices
    names = list(class_names) if class_names is not None else [str(k) for k in range(K)]
    per_class = {names[k]: float((pred[y == k] == k).float().mean()) for k in range(K) if (y == k).any()}
    return {
        "top1": float((pred == y).float().mean()),
        "top5": float((top5 == y[:, None]).any(1).float().mean()),
        "per_class": per_class,
        "n": int(y.numel()),
        "predictions": pred.tolist(),
    }


def zero_shot_classify(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    class_prompts: Sequence[Sequence[str]],
    label_key: str | None = None,
    class_names: Sequence[str] | None = None,
    image_tokenizer: nn.Module | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Zero-shot accuracy on labelled images (EvalImages or batch dicts, labels = class indices).

    class_prompts[k] are the prompts of class k (see prompts_from_templates, shapes_class_prompts).
    """
    feats = extract(model, data, "image", label_key, image_tokenizer, batch_size)
    if feats["labels"] is None:
        raise ValueError("zero-shot needs labels: give label_key or a class-folder tree")
    labels = torch.tensor([int(v) for v in feats["labels"]])
    cls = class_text_embeddings(model, tokenizer, class_prompts)
    return zero_shot_from_embeddings(feats["features"], cls, labels, class_names)
