"""A training batch -> model inputs: `InputMaker` turns a batch of a data stream
(dream_fast.data.streams) into (tokens_BLC, ids_BT, text_emb_BTE, text_mask_BT) on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dream_fast.config import ConfigError, DreamConfig
from dream_fast.model.image_tokenizer import patchify


@dataclass
class ModelInputs:
    tokens_BLC: torch.Tensor
    ids_BT: torch.Tensor
    text_emb_BTE: torch.Tensor | None = None
    text_mask_BT: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.tokens_BLC.shape[0])


def tokens_from_moments(moments: torch.Tensor, patch: int, scale: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE posterior (mean, logvar) stacked on channels -> sampled, scaled latent patches (B, L, C).

    The online (VAE) and the cached paths both go through this function, so with equal moments
    and generator state they produce the same tokens."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return patchify((mean + std * eps) * scale, patch)


class InputMaker:
    """Image tokenizer + text conditioning for one config; frozen VAE/T5 live here, not in DREAM."""

    def __init__(self, cfg: DreamConfig, device: torch.device, dtype: torch.dtype = torch.float32):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        m = cfg.model
        self.vae = None
        self.t5 = None
        if cfg.data.source != "cache":
            if m.tokenizer == "vae":
                from dream_fast.model.image_tokenizer import build_image_tokenizer

                self.vae = build_image_tokenizer(m).to(device)
            if m.text_cond == "t5":
                from dream_fast.model.text import T5Conditioner

                if not m.t5_path:
                    raise ConfigError("model.text_cond is 't5' but model.t5_path is not set; give a local "
                                      "T5EncoderModel directory or train from a cache (data.source: cache)")
                self.t5 = T5Conditioner(m.t5_path, m.t5_len, device=device)
            if m.text_cond == "precomputed":
                raise ConfigError("model.text_cond='precomputed' needs embeddings from a cache: set "
                                  "data.source: cache (see `dream-fast cache`)")

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None) -> ModelInputs:
        m, dev = self.cfg.model, self.device
        ids = batch["ids"].to(dev, non_blocking=True)
        emb = mask = None
        if "moments" in batch:  # cache shards
            moments = batch["moments"]
            if self.cfg.data.hflip:
                flip = torch.rand(moments.shape[0], generator=generator, device=dev).cpu() < 0.5
                moments = torch.where(flip[:, None, None, None], batch["moments_flip"], moments)
            tokens = tokens_from_moments(moments.to(dev), m.patch_size, m.vae_scale, generator)
            if m.text_cond != "tower":
                emb, mask = batch["t5"].to(dev).float(), batch["t5_mask"].to(dev)
        else:
            if "image_u8" in batch:
                images = batch["image_u8"].to(dev).float().div_(127.5).sub_(1.0)
                if self.cfg.data.hflip:
                    flip = torch.rand(images.shape[0], generator=generator, device=dev) < 0.5
                    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            else:
                images = batch["image"].to(dev, non_blocking=True)
            if self.vae is not None:
                with torch.no_grad():
                    moments = self.vae.moments(images)
                tokens = tokens_from_moments(moments, m.patch_size, m.vae_scale, generator)
            else:
                tokens = patchify(images, m.patch_size)
            if self.t5 is not None:
                emb, mask = self.t5(list(batch["caption"]))
                emb = emb.float()
        tokens = tokens.to(self.dtype)
        emb = emb.to(self.dtype) if emb is not None else None
        return ModelInputs(tokens, ids, emb, mask)


def dummy_inputs(cfg: DreamConfig, batch: int, device: torch.device) -> dict[str, Any]:
    """Model kwargs for a dry forward that runs every sub-module (eligible for both losses)."""
    m = cfg.model
    L, T = m.seq_len, m.text_context
    ids = torch.full((batch, T), 2, dtype=torch.long, device=device)
    ids[:, 0] = 1
    out: dict[str, Any] = {
        "tokens_BLC": torch.zeros(batch, L, m.token_dim, device=device),
        "ids_BT": ids,
        "n_masked": max(1, (L * 3) // 4),
        "order_BL": torch.arange(L, device=device).repeat(batch, 1),
    }
    if m.text_cond != "tower":
        out["text_emb_BTE"] = torch.zeros(batch, m.text_cond_len, m.text_cond_dim, device=device)
        out["text_mask_BT"] = torch.ones(batch, m.text_cond_len, dtype=torch.bool, device=device)
    return out
