"""Image<->text retrieval recall@k and the text-image alignment score with the model's own towers.

Alignment = 100 x cosine of the image and caption embeddings (a CLIP score computed by DREAM
itself), usable for generated images against their prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dream_fast.eval.features import (
    extract,
    image_embeddings,
    image_tokenizer_for,
    images_to_tokens,
    text_embeddings,
    to_image_batch,
)


def _group_ids(groups: Sequence[Any] | None, n: int) -> torch.Tensor:
    if groups is None:
        return torch.arange(n)
    if len(groups) != n:
        raise ValueError(f"need one group per pair, got {len(groups)} groups for {n} pairs")
    index: dict[Any, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in groups])


def retrieval_metrics(
    image_emb_NE: torch.Tensor,
    text_emb_NE: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    groups: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Recall@k both ways for N matched (image i, text i) pairs, by cosine similarity.

    A retrieved item counts as correct when it is the query's own pair or, with `groups`
    (e.g. the captions), any pair of the same group -- the shapes data repeats captions, and an
    image is then equally well described by each copy. Returns {"i2t_r1", "t2i_r1", ..., "n"}
    with recalls as fractions.
    """
    img = F.normalize(image_emb_NE.float(), dim=-1)
    txt = F.normalize(text_emb_NE.float(), dim=-1)
    if img.shape != txt.shape or img.dim() != 2:
        raise ValueError(f"need matched (N, E) embeddings, got {tuple(img.shape)} and {tuple(txt.shape)}")
    N = img.shape[0]
    g = _group_ids(groups, N)
    sims = img @ txt.T  # (images, texts)
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, N)
        i2t = sims.topk(kk, dim=1).indices  # texts retrieved per image
        t2i = sims.T.topk(kk, dim=1).indices  # images retrieved per text
        out[f"i2t_r{k}"] = float((g[i2t] == g[:, None]).any(dim=1).float().mean())
        out[f"t2i_r{k}"] = float((g[t2i] == g[:, None]).any(dim=1).float().mean())
    out["n"] = N
    return out


def retrieval(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    ks: Sequence[int] = (1, 5),
    group_by_caption: bool = True,
    image_tokenizer: nn.Module | None = None,
    batch_size: int = 128,
) -> dict[str, float]:
    """Retrieval recall@k on image-caption pairs (EvalImages or batch dicts with captions)."""
    feats = extract(model, data, "image", None, image_tokenizer, batch_size)
    caps = feats["captions"]
    if any(c is None for c in caps):
        raise ValueError("retrieval needs a caption for every image (.txt sidecars or shard captions)")
    txt = text_embeddings(model, tokenizer, caps)
    return retrieval_metrics(feats["features"], txt, ks, caps if group_by_caption else None)


def alignment_from_embeddings(image_emb_NE: torch.Tensor, text_emb_NE: torch.Tensor) -> torch.Tensor:
    """(N,) per-pair alignment: 100 x cosine(image i, text i)."""
    if image_emb_NE.shape != text_emb_NE.shape:
        raise ValueError(
            f"need matched embeddings, got {tuple(image_emb_NE.shape)} and {tuple(text_emb_NE.shape)}"
        )
    return 100.0 * F.cosine_similarity(image_emb_NE.float(), text_emb_NE.float(), dim=-1)


def alignment_score(
    model: nn.Module,
    tokenizer: Any,
    images: Sequence[Image.Image] | torch.Tensor,
    captions: Sequence[str],
    image_tokenizer: nn.Module | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Mean alignment (100 x cosine of own-tower embeddings) of images with their captions.

    images: PIL images (ADM-cropped to the model's size) or (N, 3, H, W) in [-1, 1].
    Returns {"score", "std", "n", "per_sample"}.
    """
    if len(images) != len(captions):
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    tok = image_tokenizer if image_tokenizer is not None else image_tokenizer_for(model)
    embs = []
    for i in range(0, len(captions), batch_size):
        x = to_image_batch(images[i : i + batch_size], model.cfg.img_size)
        embs.append(image_embeddings(model, images_to_tokens(model, x, tok)).cpu())
    per = alignment_from_embeddings(torch.cat(embs), text_embeddings(model, tokenizer, list(captions)).cpu())
    return {
        "score": float(per.mean()),
        "std": float(per.std()) if len(per) > 1 else 0.0,
        "n": len(per),
        "per_sample": per.tolist(),
    }


def alignment_on(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    image_tokenizer: nn.Module | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """alignment_score over an EvalImages source / batch dicts that carry captions."""
    feats = extract(model, data, "image", None, image_tokenizer, batch_size)
    caps = feats["captions"]
    if any(c is None for c in caps):
        raise ValueError("alignment needs a caption for every image (.txt sidecars or shard captions)")
    per = alignment_from_embeddings(feats["features"], text_embeddings(model, tokenizer, caps).cpu())
    return {
        "score": float(per.mean()),
        "std": float(per.std()) if len(per) > 1 else 0.0,
        "n": len(per),
        "per_sample": per.tolist(),
    }
