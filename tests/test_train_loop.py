"""A tiny DREAM trained in-process (plain PyTorch loop) on the shapes data lowers both losses."""

import numpy as np
import torch

from dream_fast.config import get_preset
from dream_fast.data import BPETokenizer, make_sample, to_tensor
from dream_fast.model.dream import build_model
from dream_fast.model.image_tokenizer import PixelTokenizer
from dream_fast.model.masking import num_masked, random_orders, sample_mask_ratio


def test_tiny_dream_lowers_both_losses():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = get_preset("tiny")
    cfg.model.enc_depth = cfg.model.dec_depth = 2
    cfg.mask.schedule, cfg.mask.fixed_ratio = "fixed", 0.6  # both losses eligible every step
    samples = [make_sample(0, "train", i, img_size=32) for i in range(512)]
    images = torch.stack([to_tensor(img) for img, _, _ in samples])
    captions = [c for _, c, _ in samples]
    bpe = BPETokenizer.train(captions, vocab_size=400)
    ids = bpe.encode(captions, cfg.model.text_context)
    tokens = PixelTokenizer(cfg.model.patch_size).encode(images)

    model = build_model(cfg.model, cfg.loss)
    model.set_text_specials(bpe.eot_id, bpe.encode([""], cfg.model.text_context)[0])
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3, betas=(0.9, 0.95))
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    L, B = cfg.model.seq_len, 16
    hist = {"loss_diff": [], "loss_clip": []}
    for _ in range(200):
        idx = torch.randint(0, len(samples), (B,), generator=g)
        m = num_masked(sample_mask_ratio(cfg.mask, 0.0, rng), L)
        out = model(tokens[idx], ids[idx], m, random_orders(B, L, generator=g), generator=g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        for k in hist:
            hist[k].append(out[k].item())
    for k, v in hist.items():
        first, last = np.mean(v[:20]), np.mean(v[-20:])
        print(f"{k}: first 20 steps {first:.4f} -> last 20 steps {last:.4f}")
        assert last < 0.85 * first, (k, first, last)
