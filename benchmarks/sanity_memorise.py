"""Sanity check of the whole generation path: memorise 4 captioned shapes images (600 steps, mask
ratio U(0.5, 1)), then generate them from their captions with DreamPipeline and read them with the
oracle. If this fails, generation is broken; if it passes, poor demo samples mean undertraining.

    python -m benchmarks.sanity_memorise     # ~3 minutes on 2 idle cores; writes sanity_memorise.png
"""

from __future__ import annotations

import time

import numpy as np
import torch

from dream_fast.config import get_preset
from dream_fast.data import BPETokenizer, caption_grid, make_sample, to_tensor
from dream_fast.eval import oracle_accuracy
from dream_fast.model.dream import build_model
from dream_fast.model.image_tokenizer import PixelTokenizer
from dream_fast.model.masking import num_masked, random_orders
from dream_fast.sampling import DreamPipeline


def main(steps: int = 600, batch: int = 32) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = get_preset("tiny")
    cfg.model.enc_depth = cfg.model.dec_depth = 2
    samples = [make_sample(0, "train", i) for i in range(4)]
    captions = [c for _, c, _ in samples]
    bpe = BPETokenizer.train([make_sample(0, "train", i)[1] for i in range(300)], 400)
    ids = bpe.encode(captions, cfg.model.text_context)
    tokens = PixelTokenizer(cfg.model.patch_size).encode(torch.stack([to_tensor(im) for im, _, _ in samples]))
    model = build_model(cfg.model, cfg.loss)
    model.set_text_specials(bpe.eot_id, bpe.encode([""], cfg.model.text_context)[0])
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3, betas=(0.9, 0.95))
    rng, L, t0 = np.random.default_rng(0), cfg.model.seq_len, time.time()
    for step in range(steps):
        idx = torch.randint(0, len(samples), (batch,))
        out = model(tokens[idx], ids[idx], num_masked(rng.uniform(0.5, 1.0), L), random_orders(batch, L))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss_diff {out['loss_diff'].item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    res = DreamPipeline(model, cfg, bpe)(captions * 2, num_candidates=1, seed=0, batch_size=8, progress=False)
    acc = oracle_accuracy(res.images, [m for _, _, m in samples] * 2)
    print(acc)
    grid = caption_grid([im for im, _, _ in samples] + res.images, captions * 3, ncols=4)
    grid.save("sanity_memorise.png")
    return acc


if __name__ == "__main__":
    main()
