"""A random tiny-preset bundle on disk (depth 1, a BPE tokenizer trained on shapes captions), for the
tests of tools that read exported models (eval CLI, diagnostics)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dream_fast.config import get_preset
from dream_fast.data import BPETokenizer, make_sample
from dream_fast.model.dream import DREAM, build_model
from dream_fast.pretrained import save_pretrained


def tiny_bundle(path: Path, prepare: Callable[[DREAM], None] | None = None) -> Path:
    """Save a seeded random tiny DREAM at path; prepare(model) may edit its weights first (no grad)."""
    cfg = get_preset("tiny")
    cfg.model.enc_depth = cfg.model.dec_depth = cfg.model.text_depth = 1
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    if prepare is not None:
        with torch.no_grad():
            prepare(model)
    tok = BPETokenizer.train([make_sample(0, "train", i)[1] for i in range(200)], 300)
    model.set_text_specials(tok.eot_id, tok.encode([""], cfg.model.text_context)[0])
    return save_pretrained(model.state_dict(), cfg, tok, path)
