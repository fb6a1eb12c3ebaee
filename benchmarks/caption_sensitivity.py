"""Does the generator read the caption? A diagnostic for text-to-image models on the shapes domain.

For held-out-free val images with every token masked (generation from text alone), it measures the
diffusion head's ε-MSE on the shape's tokens and on background tokens with the right caption, with
the shape's colour, position or shape word swapped (same timesteps and noise in every case). A
decoder that uses a word gets a higher loss when that word is wrong. It also prints how far apart the
text features of each swapped caption are from the right one at each stage (tower, aligner): the
largest per-token distance, averaged over captions.

    python -m benchmarks.caption_sensitivity demo_out/model [more bundles]   # ~20 s per bundle on CPU
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dream_fast.data import to_tensor
from dream_fast.data.shapes import SPEC, ImageAttrs, caption, render, sample_attributes, sample_rng
from dream_fast.model.image_tokenizer import build_image_tokenizer
from dream_fast.pretrained import load_pretrained

# the caption words whose swap is measured (ShapeAttrs field f"{word}_id") and their vocabularies
SWAPPED = {"colour": SPEC.colours, "position": SPEC.positions, "shape": SPEC.shapes}


def _images(attrs: list[ImageAttrs], size: int) -> torch.Tensor:
    return torch.stack([to_tensor(render(a, size)) for a in attrs])


def _swap(a: ImageAttrs, field: str, n: int, i: int) -> ImageAttrs:
    """The same image description with one attribute of its first shape changed (cycled by i)."""
    sh = a.shapes[0]
    new = dataclasses.replace(sh, **{field: (getattr(sh, field) + 1 + i % (n - 1)) % n})
    return ImageAttrs((new,) + a.shapes[1:], a.background_id)


@torch.no_grad()
def sensitivity(bundle: str, n: int = 256, reps: int = 4) -> dict[str, float]:
    pre = load_pretrained(bundle)
    model, cfg = pre.model.eval(), pre.cfg.model
    if pre.tokenizer is None or cfg.tokenizer != "pixel":
        raise ValueError(f"{bundle}: needs a pixel-token model with its tokenizer (the shapes presets)")
    attrs = [sample_attributes(sample_rng(7, "val", i), "val") for i in range(n)]
    tok = build_image_tokenizer(cfg)
    x0 = tok.encode(_images(attrs, cfg.img_size))
    background = tok.encode(_images([ImageAttrs((), a.background_id) for a in attrs], cfg.img_size))
    is_shape = (x0 - background).abs().amax(-1) > 0.05  # (n, L) tokens the shape touches
    L, C = x0.shape[1], x0.shape[2]
    captions = {"right": [caption(a) for a in attrs]}
    for word, values in SWAPPED.items():
        captions[f"wrong {word}"] = [caption(_swap(a, f"{word}_id", len(values), i)) for i, a in enumerate(attrs)]
    diffusion = model.diffloss.train_diffusion
    diffusion.to(torch.device("cpu"))
    keep = torch.zeros(n, 0, dtype=torch.long)  # nothing visible
    enc = model.encode(x0, keep)
    out: dict[str, float] = {"shape_token_fraction": float(is_shape.float().mean())}
    feats = {}
    for name, caps in captions.items():
        ids = pre.tokenizer.encode(caps, cfg.text_context)
        _, hidden, mask = model.text_features(ids)
        cond = model.text_condition(hidden, mask)
        feats[name] = (hidden, cond.tokens)
        z = model.diffloss.net.cond_embed(model.decode(enc, keep, cond).reshape(n * L, -1))
        mse = torch.zeros(n * L)
        for r in range(reps):
            g = torch.Generator().manual_seed(r)
            t = torch.randint(0, diffusion.num_timesteps, (n * L,), generator=g)
            noise = torch.randn(n * L, C, generator=g)
            terms = diffusion.training_losses(model.diffloss.net, x0.reshape(n * L, C), t, {"cond_NW": z}, noise=noise)
            mse += terms["mse"] / reps
        mse = mse.reshape(n, L)
        out[f"shape mse, {name}"] = float(mse[is_shape].mean())
        out[f"background mse, {name}"] = float(mse[~is_shape].mean())
    for stage, k in (("tower", 0), ("aligner", 1)):
        a = feats["right"][k]
        out[f"{stage} feature norm"] = float(a.norm(dim=-1).mean())
        for word in SWAPPED:
            b = feats[f"wrong {word}"][k]
            out[f"{stage} {word}-swap distance"] = float((a - b).norm(dim=-1).amax(dim=1).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="exported model directories (dream-fast export / demo_out/model)")
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    for b in args.bundles:
        res = sensitivity(b, args.images)
        print(f"\n{b}")
        for k, v in res.items():
            print(f"  {k:34s} {v:.4f}")


if __name__ == "__main__":
    main()
