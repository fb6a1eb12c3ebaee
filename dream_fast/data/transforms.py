"""Image preprocessing (ADM centre crop, flip, [-1, 1] tensors), its inverse, and captioned grids.

The crop follows docs/design.md §1.1; `caption_grid` lays out samples with their prompts for inspection.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from dream_fast.lazy import lazy_module

Image, ImageDraw, ImageFont = (lazy_module(f"PIL.{m}") for m in ("Image", "ImageDraw", "ImageFont"))


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM crop: halve with a box filter while the short side >= 2*size, bicubic-resize the
    short side to `size`, then crop the centre size x size. Returns an RGB image."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    scale = size / min(img.size)
    new_w, new_h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> FloatTensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x_HWC = torch.from_numpy(arr.copy()).float()
    return x_HWC.permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def preprocess(
    img: Image.Image, size: int, flip: bool = False, rng: random.Random | None = None
) -> torch.Tensor:
    """ADM centre crop to `size`, a random horizontal flip (p = 0.5, drawn from `rng`) when
    `flip`, then FloatTensor (3, size, size) in [-1, 1]."""
    img = adm_center_crop(img, size)
    if flip and (rng if rng is not None else random).random() < 0.5:
        img = hflip(img)
    return to_tensor(img)


def to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """Inverse of to_tensor: (3, H, W) -> one image, (B, 3, H, W) -> list; values in [-1, 1]
    are clamped and rounded to uint8."""
    if x.dim() not in (3, 4) or x.shape[-3] not in (1, 3):
        raise ValueError(f"to_pil expects (3, H, W) or (B, 3, H, W) (or 1 channel), got {tuple(x.shape)}")
    u8 = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if u8.shape[-3] == 1:
        u8 = u8.expand(*u8.shape[:-3], 3, *u8.shape[-2:])
    arr = u8.movedim(-3, -1).numpy()
    if arr.ndim == 3:
        return Image.fromarray(arr, "RGB")
    return [Image.fromarray(a, "RGB") for a in arr]


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap by measured pixel width (words longer than a line are hard-split)."""
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split():
            cand = f"{cur} {word}" if cur else word
            if draw.textlength(cand, font=font) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                # Find the longest prefix that fits.
                cut = max(1, len(word) - 1)
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            cur = word
        lines.append(cur)
    return lines


def caption_grid(
    images: list[Image.Image],
    captions: list[str],
    ncols: int = 8,
    cell_size: int | None = None,
    max_lines: int = 5,
    pad: int = 4,
) -> Image.Image:
    """Grid of images with each caption wrapped underneath (PIL default font).

    Images are scaled (nearest neighbour, so small samples stay crisp) to `cell_size` pixels
    (default: the largest image side, at least 128); captions longer than `max_lines` lines end
    with "...".
    """
    if len(images) != len(captions):
        raise ValueError(f"caption_grid needs one caption per image, got {len(images)} images and "
                         f"{len(captions)} captions")  # fmt: skip
    if not images:
        raise ValueError("caption_grid needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(images))
    cell = cell_size or max(128, max(max(im.size) for im in images))
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for text in captions:
        lines = _wrap(text, probe, font, cell)
        if len(lines) > max_lines:
            last = lines[max_lines - 1]
            while last and probe.textlength(last + "...", font=font) > cell:
                last = last[:-1]
            lines = lines[: max_lines - 1] + [last + "..."]
        wrapped.append(lines)
    bbox = probe.textbbox((0, 0), "Ag", font=font)
    line_h = bbox[3] - bbox[1] + 2
    text_h = line_h * max(len(w) for w in wrapped)
    nrows = -(-len(images) // ncols)
    cw, ch = cell + pad, cell + text_h + 2 * pad
    grid = Image.new("RGB", (ncols * cw + pad, nrows * ch + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, ncols)
        x, y = pad + c * cw, pad + r * ch
        grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell + pad + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid
