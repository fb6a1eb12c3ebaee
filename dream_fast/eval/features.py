"""Frozen-model embeddings for evaluation and the labelled image sources they are read from.

Probe features = mean of the buffer outputs of the encoder on all tokens (docs/design.md §1.11); image
and text embeddings = the contrastive towers' L2-normalised projections.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dream_fast.data.transforms import preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off, BatchNorm on running stats) and no grad; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def image_tokenizer_for(model: nn.Module) -> nn.Module:
    """The model's image tokenizer (pixel patches, or the VAE named in its config)."""
    from dream_fast.model.image_tokenizer import build_image_tokenizer

    return build_image_tokenizer(model.cfg)


def to_image_batch(images: Sequence[Image.Image] | torch.Tensor, img_size: int) -> torch.Tensor:
    """(B, 3, img_size, img_size) in [-1, 1] from PIL images (ADM crop) or such a tensor."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        if images.shape[-1] != img_size or images.shape[-2] != img_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px but the model takes {img_size} px")
        return images
    if len(images) == 0:
        raise ValueError("got no images")
    return torch.stack([preprocess(im, img_size) for im in images])


def images_to_tokens(
    model: nn.Module, images_B3HW: torch.Tensor, image_tokenizer: nn.Module | None = None
) -> torch.Tensor:
    """Image tokens (B, L, C) for the model (its own tokenizer unless one is given)."""
    tok = image_tokenizer if image_tokenizer is not None else image_tokenizer_for(model)
    dev = model_device(model)
    with torch.no_grad():
        # the tokenizer runs in fp32; the encoder may hold bf16/fp16 weights (load_pretrained dtype=)
        tokens = tok.encode(images_B3HW.to(dev)).to(model.z_proj.weight.dtype)
    if tokens.shape[1:] != (model.seq_len, model.token_dim):
        raise ValueError(
            f"image tokens have shape {tuple(tokens.shape[1:])}, the model expects "
            f"({model.seq_len}, {model.token_dim}); are the images {model.cfg.img_size} px?"
        )
    return tokens


def encode_all(model: nn.Module, tokens_BLC: torch.Tensor) -> torch.Tensor:
    """Encoder on every token (nothing masked) -> (B, S + L, D)."""
    B, L, _ = tokens_BLC.shape
    keep_BL = torch.arange(L, device=tokens_BLC.device).expand(B, L).contiguous()
    with frozen(model):
        return model.encode(tokens_BLC, keep_BL)


def probe_features(model: nn.Module, tokens_BLC: torch.Tensor) -> torch.Tensor:
    """(B, D): mean of the S buffer outputs (all outputs when the model has no buffer)."""
    enc = encode_all(model, tokens_BLC)
    S = model.buffer_size
    return (enc[:, :S] if S > 0 else enc).mean(dim=1).float()


def image_embeddings(model: nn.Module, tokens_BLC: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B, E) projected image embeddings of the unmasked images (L2-normalised by default)."""
    enc = encode_all(model, tokens_BLC)
    with frozen(model):
        emb = model.image_embedding(enc).float()
    return F.normalize(emb, dim=-1) if normalize else emb


def text_embeddings(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 256, normalize: bool = True
) -> torch.Tensor:
    """(N, E) projected text-tower embeddings (L2-normalised by default)."""
    if len(texts) == 0:
        raise ValueError("got no texts")
    dev, out = model_device(model), []
    with frozen(model):
        for i in range(0, len(texts), batch_size):
            ids = tokenizer.encode(list(texts[i : i + batch_size]), model.cfg.text_context).to(dev)
            out.append(model.text_features(ids)[0].float())
    emb = torch.cat(out)
    return F.normalize(emb, dim=-1) if normalize else emb


# --------------------------------------------------------------------------------------------
# Labelled image sources: image-text shards, class-subfolder trees, flat folders with sidecars
# --------------------------------------------------------------------------------------------


def _label_of(meta: dict[str, Any] | None, label_key: str, where: str) -> Any:
    if not meta or label_key not in meta:
        have = sorted(meta) if meta else []
        raise ValueError(
            f"{where} has no label {label_key!r} in its json metadata (keys: {have}); pass --label-key"
        )
    return meta[label_key]


@dataclass
class EvalImages:
    """A labelled image source read in batches of {"image" (B,3,H,W) in [-1,1], "caption",
    "meta", "label"} (lists of str|None, dict, label value|None).

    source: image-text shards (a pattern/glob/list as in expand_urls), a folder with one
    subfolder per class (label = class index, class_names = folder names), or a flat folder of
    images with sidecar NAME.txt captions and NAME.json metas.
    """

    source: str | os.PathLike | Sequence[str]
    img_size: int
    label_key: str | None = None
    max_samples: int | None = None
    kind: str = field(init=False)
    class_names: list[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        src = self.source
        if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
            d = Path(src)
            subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            if subdirs and any(self._images(s) for s in subdirs):
                self.kind = "classes"
                self.class_names = [s.name for s in subdirs]
            elif self._images(d):
                self.kind = "flat"
            else:
                raise ValueError(f"folder {str(d)!r} holds no images and no class subfolders with images")
        else:
            from dream_fast.data.shards import expand_urls

            expand_urls(src)  # fail now, with its clear message, on an empty pattern
            self.kind = "shards"

    @staticmethod
    def _images(d: Path) -> list[Path]:
        return sorted(
            p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )

    def _items(self) -> Iterator[tuple[Image.Image | torch.Tensor, str | None, dict[str, Any], Any]]:
        if self.kind == "shards":
            from dream_fast.data.shards import ImageTextShards

            src = self.source if isinstance(self.source, (str, os.PathLike)) else list(self.source)
            ds = ImageTextShards(
                src, img_size=self.img_size, shuffle_buffer=0, rank=0, world_size=1, with_meta=True
            )
            for s in ds:
                label = _label_of(s["meta"], self.label_key, f"sample {s['key']}") if self.label_key else None
                yield s["image"], s["caption"], s["meta"], label
            return
        d = Path(self.source)
        if self.kind == "classes":
            for k, sub in enumerate(d / c for c in self.class_names or []):
                for p in self._images(sub):
                    yield self._open(p), None, {"path": str(p), "class": sub.name}, k
            return
        for p in self._images(d):
            cap_path, meta_path = p.with_suffix(".txt"), p.with_suffix(".json")
            caption = cap_path.read_text().strip() if cap_path.is_file() else None
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            if caption is None and isinstance(meta.get("caption"), str):
                caption = meta["caption"]
            label = _label_of(meta, self.label_key, str(p)) if self.label_key else None
            yield self._open(p), caption, {**meta, "path": str(p)}, label

    @staticmethod
    def _open(p: Path) -> Image.Image:
        with Image.open(p) as im:
            return im.convert("RGB")

    def batches(self, batch_size: int = 128) -> Iterator[dict[str, Any]]:
        buf: list[tuple[Any, ...]] = []
        n = 0
        for item in self._items():
            if self.max_samples is not None and n >= self.max_samples:
                break
            buf.append(item)
            n += 1
            if len(buf) == batch_size:
                yield self._collate(buf)
                buf = []
        if buf:
            yield self._collate(buf)

    def _collate(self, items: list[tuple[Any, ...]]) -> dict[str, Any]:
        ims = [im if isinstance(im, torch.Tensor) else preprocess(im, self.img_size) for im, *_ in items]
        return {
            "image": torch.stack(ims),
            "caption": [it[1] for it in items],
            "meta": [it[2] for it in items],
            "label": [it[3] for it in items],
        }

    def load(self) -> dict[str, Any]:
        """Everything in memory: {"image" (N,3,H,W), "caption", "meta", "label"} lists/tensor."""
        parts = list(self.batches())
        if not parts:
            raise ValueError(f"no images read from {self.source!r}")
        return {
            "image": torch.cat([p["image"] for p in parts]),
            **{k: [v for p in parts for v in p[k]] for k in ("caption", "meta", "label")},
        }


def iter_batches(
    data: EvalImages | Iterable[dict[str, Any]], batch_size: int = 128
) -> Iterator[dict[str, Any]]:
    """Batches from an EvalImages or any iterable of dicts with "image" (e.g. a shards loader)."""
    if isinstance(data, EvalImages):
        yield from data.batches(batch_size)
    else:
        yield from data


def extract(
    model: nn.Module,
    data: EvalImages | Iterable[dict[str, Any]],
    what: str = "probe",
    label_key: str | None = None,
    image_tokenizer: nn.Module | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Features of every image: what="probe" -> buffer-mean (N, D), "image" -> normalised (N, E).

    Returns {"features", "captions", "metas", "labels"}; labels come from each batch's "label"
    list, or from meta[label_key] for loader batches that carry "meta".
    """
    if what not in ("probe", "image"):
        raise ValueError(f"what must be 'probe' or 'image', got {what!r}")
    tok = image_tokenizer if image_tokenizer is not None else image_tokenizer_for(model)
    feats, caps, metas, labels = [], [], [], []
    for batch in iter_batches(data, batch_size):
        tokens = images_to_tokens(model, batch["image"], tok)
        f = probe_features(model, tokens) if what == "probe" else image_embeddings(model, tokens)
        feats.append(f.cpu())
        B = f.shape[0]
        metas_b = batch.get("meta") or [{}] * B
        caps += list(batch.get("caption") or [None] * B)
        metas += list(metas_b)
        if batch.get("label") is not None and any(v is not None for v in batch["label"]):
            labels += list(batch["label"])
        elif label_key is not None:
            labels += [_label_of(m, label_key, "a batch sample") for m in metas_b]
    if not feats:
        raise ValueError("no images to extract features from")
    return {"features": torch.cat(feats), "captions": caps, "metas": metas, "labels": labels or None}
