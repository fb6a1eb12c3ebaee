"""Image tokenizers with one interface: `encode(images) -> tokens_BLC`, `decode(tokens_BLC) -> images`.

PixelTokenizer: non-overlapping p x p pixel patches (no weights, tiny presets).
VAETokenizer: frozen SD-VAE (diffusers AutoencoderKL from a local directory), latents scaled by
0.18215 and cut into p x p latent patches (docs/design.md §1.1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def patchify(x_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p), row-major over the patch grid."""
    B, C, H, W = x_BCHW.shape
    h, w = H // p, W // p
    x = x_BCHW.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, h * w, C * p * p)


def unpatchify(x_BLC: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """Inverse of `patchify` for a square grid."""
    B, L, _ = x_BLC.shape
    h = int(round(L**0.5))
    if h * h != L:
        raise ValueError(f"unpatchify needs a square token grid, got L={L}")
    x = x_BLC.reshape(B, h, h, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, h * p, h * p)


class PixelTokenizer(nn.Module):
    """Pixels in [-1, 1] <-> tokens of 3 p^2 values."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.p = patch_size

    @property
    def token_dim(self) -> int:
        return 3 * self.p**2

    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return patchify(images_BCHW, self.p)

    def decode(self, tokens_BLC: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens_BLC, self.p, 3).clamp(-1, 1)


class VAETokenizer(nn.Module):
    """Frozen SD-VAE: posterior sample * scale -> p x p latent patches."""

    def __init__(self, vae_path: str, patch_size: int = 2, scale: float = 0.18215):
        super().__init__()
        path = Path(vae_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"VAE directory {str(path)!r} has no config.json; expected a diffusers AutoencoderKL "
                "directory (e.g. a local copy of stabilityai/sd-vae-ft-ema)"
            )
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(str(path)).eval().requires_grad_(False)
        self.p, self.scale = patch_size, scale
        self.channels = self.vae.config.latent_channels

    @property
    def token_dim(self) -> int:
        return self.channels * self.p**2

    @torch.no_grad()
    def moments(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Posterior (mean, logvar) stacked on channels: (B, 2 C_lat, h, w); what the cache stores."""
        return self.vae.encode(images_BCHW).latent_dist.parameters

    def tokens_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return patchify((mean + std * eps) * self.scale, self.p)

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.tokens_from_moments(self.moments(images_BCHW), generator)

    @torch.no_grad()
    def decode(self, tokens_BLC: torch.Tensor) -> torch.Tensor:
        z = unpatchify(tokens_BLC, self.p, self.channels) / self.scale
        return self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)


def build_image_tokenizer(model_cfg) -> nn.Module:
    if model_cfg.tokenizer == "pixel":
        return PixelTokenizer(model_cfg.patch_size)
    if not model_cfg.vae_path:
        raise ValueError("model.tokenizer is 'vae' but model.vae_path is not set; give a local AutoencoderKL directory")
    return VAETokenizer(model_cfg.vae_path, model_cfg.patch_size, model_cfg.vae_scale)
