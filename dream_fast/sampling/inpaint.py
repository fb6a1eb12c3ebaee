"""Inpainting and outpainting inputs: an image and a mask become known tokens and the positions to
generate; the known tokens end every generation order, so the encoder sees them from step 0.

Mask convention: white / True / 1 = generate, black / False / 0 = keep. A token is generated when
any pixel of its cell is masked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dream_fast.config import ModelConfig
from dream_fast.data.transforms import adm_center_crop, to_tensor


@dataclass
class InpaintInputs:
    """known_tokens_1LC: the image's tokens (1, L, C); unknown_idx_U: token positions to generate."""

    known_tokens_1LC: torch.Tensor
    unknown_idx_U: torch.Tensor
    image: Image.Image  # the image at the model's size (for grids)
    mask: Image.Image  # the pixel mask at the model's size


def _open(x, what: str) -> Image.Image:
    if isinstance(x, (str, os.PathLike)):
        if not os.path.exists(x):
            raise FileNotFoundError(f"{what} file {str(x)!r} does not exist")
        return Image.open(x)
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, (np.ndarray, torch.Tensor)):
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        if arr.ndim != 2:
            raise ValueError(f"{what} array must be 2-D (H, W), got shape {arr.shape}")
        return Image.fromarray((arr.astype(np.float32) > 0.5).astype(np.uint8) * 255, "L")
    raise TypeError(f"{what} must be a PIL image, a path or a 2-D array, got {type(x).__name__}")


def outpaint_mask(size: int, keep_box: tuple[int, int, int, int]) -> Image.Image:
    """A mask that generates everything outside keep_box = (left, top, right, bottom) pixels."""
    m = Image.new("L", (size, size), 255)
    m.paste(0, keep_box)
    return m


def token_mask(mask: Image.Image, grid: int) -> torch.Tensor:
    """(grid², ) bool, row-major like the tokenizers' patch order: True = generate."""
    arr = np.asarray(mask.convert("L"), dtype=np.uint8) > 127
    H, W = arr.shape
    if H % grid or W % grid:
        raise ValueError(f"mask of {W}x{H} pixels does not tile into a {grid}x{grid} token grid")
    cells = arr.reshape(grid, H // grid, grid, W // grid).any(axis=(1, 3))
    return torch.from_numpy(cells.reshape(-1).copy())


def prepare_inpainting(
    image, mask, model_cfg: ModelConfig, image_tokenizer, device: torch.device | str = "cpu"
) -> InpaintInputs:
    """Check sizes, bring image and mask to the model's resolution, tokenize the image."""
    img = _open(image, "image").convert("RGB")
    msk = _open(mask, "mask").convert("L")
    if img.size != msk.size:
        raise ValueError(
            f"image is {img.size[0]}x{img.size[1]} but mask is {msk.size[0]}x{msk.size[1]}; they must be the same size"
        )
    size = model_cfg.img_size
    if img.size != (size, size):
        img = adm_center_crop(img, size)
        msk = adm_center_crop(msk, size)
    unknown = token_mask(msk, model_cfg.grid)
    if not bool(unknown.any()):
        raise ValueError("the mask selects no region to generate (white/True marks pixels to generate)")
    with torch.no_grad():
        known = image_tokenizer.encode(to_tensor(img)[None].to(device)).float()
    return InpaintInputs(known, unknown.nonzero().reshape(-1), img, msk)
