"""Can the generator draw a shape's edge inside a token? A diagnostic for pixel-token shapes models.

Tokens of the tiny preset are 4x4 pixels and a shape is 10-13 pixels wide, so many of a shape's tokens
are only partly covered: the shape's outline lives inside those "edge tokens". Three measurements:

- **context fill** (a trained bundle): every edge token of n val images is generated alone, with every
  other token of its image visible and the right caption (the easiest case a generator ever meets: the
  neighbours fix the outline). Each generated pixel is read as shape or background (nearest of the two
  colours) and compared with the real image. Two yardsticks: the best any whole-token drawing can do (each
  token all shape or all background, by majority), and all-shape tokens.
- **linear readouts** (same bundle, same edge tokens): a ridge regression, fitted on 70% of the edge tokens
  and scored on the rest, from (a) the encoder's output at the token when everything is visible and (b) the
  decoder's z at the token in the context fill. (a) tells whether the outline reaches the decoder at all,
  (b) whether the decoder passes it on to the head.
- **head alone** (no bundle needed): a fresh diffusion head of the same size, trained for `steps` with
  z = the true token itself (perfect information), then sampled on edge tokens. It tells whether the head
  can draw an edge at all when z says where it is.

If the head alone draws edges, the encoder readout keeps them and the z readout does not, the decoder is
what has not learnt to infer a token's outline from its neighbours and the caption.

    python -m benchmarks.edge_tokens demo_out/model --images 256 --head-steps 600   # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import time

import torch

from dream_fast.config import ModelConfig, get_preset
from dream_fast.data import to_tensor
from dream_fast.data.shapes import SPEC, ImageAttrs, caption, render, sample_attributes, sample_rng
from dream_fast.model.diffloss import DiffLoss
from dream_fast.model.image_tokenizer import build_image_tokenizer
from dream_fast.pretrained import Pretrained, load_pretrained


def shapes_tokens(cfg: ModelConfig, n: int, seed: int = 11) -> dict:
    """Tokens of n val images, their background-only tokens, per-token shape cover, edge tokens (covered
    partly), shape and background colours in [-1, 1], and captions."""
    if cfg.tokenizer != "pixel":
        raise ValueError("edge tokens need a pixel-token model (model.tokenizer: pixel, the shapes presets)")
    attrs = [sample_attributes(sample_rng(seed, "val", i), "val") for i in range(n)]
    tok = build_image_tokenizer(cfg)

    def tokens(a: list[ImageAttrs]) -> torch.Tensor:
        return tok.encode(torch.stack([to_tensor(render(x, cfg.img_size)) for x in a]))

    x0 = tokens(attrs)
    bg = tokens([ImageAttrs((), a.background_id) for a in attrs])
    B, L, C = x0.shape
    on_shape = (x0 - bg).reshape(B, L, 3, -1).abs().amax(2) > 0.05  # (B, L, p*p): pixel touched by the shape
    cover = on_shape.float().mean(-1)
    def colours(rgb: list[tuple[int, int, int]]) -> torch.Tensor:  # the same scaling as to_tensor
        return torch.tensor(rgb, dtype=x0.dtype) / 127.5 - 1.0

    return {"x0": x0, "bg": bg, "cover": cover, "edge": (cover > 0) & (cover < 1),
            "fg": colours([SPEC.colour_rgb[a.shapes[0].colour] for a in attrs]),
            "bg_rgb": colours([SPEC.background_rgb[a.background] for a in attrs]),
            "captions": [caption(a) for a in attrs]}


def pixel_error(tokens_RC: torch.Tensor, truth_RC: torch.Tensor, fg_R3: torch.Tensor, bg_R3: torch.Tensor) -> float:
    """Fraction of pixels read as the wrong class (shape vs background, nearest of the two colours)."""
    R = tokens_RC.shape[0]

    def classify(t: torch.Tensor) -> torch.Tensor:
        px = t.reshape(R, 3, -1).transpose(1, 2)  # (R, p*p, 3)
        return (px - fg_R3[:, None]).norm(dim=-1) < (px - bg_R3[:, None]).norm(dim=-1)

    return float((classify(tokens_RC) != classify(truth_RC)).float().mean())


def linear_readout(x_RD: torch.Tensor, truth_RC: torch.Tensor, fg_R3: torch.Tensor, bg_R3: torch.Tensor,
                   train_frac: float = 0.7, ridge: float = 1e-2) -> float:
    """Pixel error of a ridge regression features -> token, fitted on the first train_frac rows, scored on the rest."""
    R = x_RD.shape[0]
    n_fit = int(train_frac * R)
    if n_fit < 1 or n_fit >= R:
        raise ValueError(f"need rows to fit and to score, got {R} rows")
    x = torch.cat([x_RD.double(), x_RD.new_ones(R, 1).double()], 1)
    a, y = x[:n_fit], truth_RC[:n_fit].double()
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    pred = (x[n_fit:] @ w).to(truth_RC.dtype)
    return pixel_error(pred, truth_RC[n_fit:], fg_R3[n_fit:], bg_R3[n_fit:])


def _yardsticks(d: dict, img: torch.Tensor, pos: torch.Tensor) -> dict[str, float]:
    truth = d["x0"][img, pos]
    fg, bg_tok, bg3 = d["fg"][img], d["bg"][img, pos], d["bg_rgb"][img]
    C = truth.shape[1]
    fg_tok = fg[:, :, None].expand(-1, -1, C // 3).reshape(-1, C)
    majority = torch.where((d["cover"][img, pos] >= 0.5)[:, None], fg_tok, bg_tok)
    return {"whole tokens, majority": pixel_error(majority, truth, fg, bg3),
            "all-shape tokens": pixel_error(fg_tok, truth, fg, bg3)}


@torch.no_grad()
def context_fill(pre: Pretrained, n: int = 256, temperature: float = 0.5, seed: int = 0, chunk: int = 256) -> dict:
    """Each edge token of a loaded bundle generated alone from its image's other tokens and caption (no guidance)."""
    model, cfg = pre.model.eval(), pre.cfg.model
    if cfg.text_cond != "tower" or pre.tokenizer is None:
        raise ValueError("needs a model with its own text tower and tokenizer (the shapes presets)")
    d = shapes_tokens(cfg, n)
    L = d["x0"].shape[1]
    img, pos = d["edge"].nonzero(as_tuple=True)
    ids = pre.tokenizer.encode(d["captions"], cfg.text_context)
    g = torch.Generator().manual_seed(seed)
    out, zs = [], []
    for s in range(0, img.numel(), chunk):
        i, p = img[s : s + chunk], pos[s : s + chunk]
        others = torch.arange(L).expand(i.numel(), -1)
        keep = others[others != p[:, None]].reshape(i.numel(), L - 1)
        enc = model.encode(d["x0"][i], keep)
        _, hidden, mask = model.text_features(ids[i])
        z = model.decode(enc, keep, model.text_condition(hidden, mask))
        z = z[torch.arange(i.numel()), p]
        zs.append(z.float())
        out.append(model.diffloss.sample(z.float(), temperature=temperature, generator=g))
    gen = torch.cat(out)
    truth, fg, bg3 = d["x0"][img, pos], d["fg"][img], d["bg_rgb"][img]
    all_visible = torch.arange(L).expand(d["x0"].shape[0], -1)
    enc = model.encode(d["x0"], all_visible)[img, cfg.buffer_size + pos].float()
    res = {"edge tokens": int(img.numel()), "edge-token share": float(d["edge"].float().mean()),
           "model": pixel_error(gen, truth, fg, bg3),
           "readout: encoder output": linear_readout(enc, truth, fg, bg3),
           "readout: decoder z": linear_readout(torch.cat(zs), truth, fg, bg3)}
    res.update(_yardsticks(d, img, pos))
    return res


def head_alone(cfg: ModelConfig, steps: int = 600, rows: int = 2048, lr: float = 5e-4, n: int = 1000,
               temperature: float = 0.5, seed: int = 0) -> dict:
    """A fresh head of cfg's size trained with z = the true token; its pixel error on edge tokens."""
    torch.manual_seed(seed)
    d = shapes_tokens(cfg, n)
    C = d["x0"].shape[2]
    tokens = d["x0"].reshape(-1, C)
    head = DiffLoss(C, C, cfg.diffloss_w, cfg.diffloss_d, cfg.num_train_timesteps, cfg.num_sampling_steps,
                    cfg.noise_schedule, cfg.diffusion_batch_mul, cfg.diffusion_weighting)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        x = tokens[torch.randint(0, tokens.shape[0], (rows,))]
        loss = head(x, x)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    img, pos = d["edge"].nonzero(as_tuple=True)
    truth = d["x0"][img, pos]
    with torch.no_grad():
        gen = head.sample(truth, temperature=temperature)
    res = {"steps": steps, "train seconds": time.perf_counter() - t0,
           "final loss": sum(losses[-50:]) / len(losses[-50:]),
           "model": pixel_error(gen, truth, d["fg"][img], d["bg_rgb"][img])}
    res.update(_yardsticks(d, img, pos))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", help="exported model directories (dream-fast export / demo_out/model)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--head-steps", type=int, default=600, help="0 skips the head-alone run")
    args = ap.parse_args()
    print("pixel error on edge tokens (shape vs background per pixel; lower is better)")
    head_cfg = None  # the head-alone run takes the first bundle's sizes (the tiny preset's without one)
    for b in args.bundles:
        pre = load_pretrained(b)
        head_cfg = head_cfg or pre.cfg.model
        _print(f"context fill, {b}", context_fill(pre, args.images))
    if args.head_steps:
        _print("head alone, z = the true token", head_alone(head_cfg or get_preset("tiny").model, args.head_steps))


def _print(title: str, res: dict) -> None:
    print(f"\n{title}")
    for k, v in res.items():
        print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")


if __name__ == "__main__":
    main()
