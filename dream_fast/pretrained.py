"""Inference bundles on disk: EMA weights (safetensors) + config (YAML) + BPE tokenizer (JSON).

`save_pretrained` writes one directory atomically; `load_pretrained` reads it back without ever
unpickling (safetensors only) and says exactly which file is missing or wrong.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from dream_fast.config import DreamConfig, config_from_dict
from dream_fast.data.bpe import BPETokenizer
from dream_fast.model.dream import DREAM, build_model

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.yaml", "tokenizer.json"


@dataclass
class Pretrained:
    model: DREAM
    cfg: DreamConfig
    tokenizer: BPETokenizer


def save_pretrained(state_dict: dict[str, torch.Tensor], cfg: DreamConfig, tokenizer: BPETokenizer,
                    out_dir: str | os.PathLike) -> Path:
    """Write weights + config + tokenizer into `out_dir` (replaced atomically if it exists)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "dream_fast"})
        (tmp / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tokenizer.save(tmp / TOKENIZER)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Pretrained:
    """Load an export directory written by `save_pretrained` (or `dream-fast export`)."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(d)!r} does not exist")
    missing = [n for n in (WEIGHTS, CONFIG, TOKENIZER) if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint directory {str(d)!r} is missing {missing}; expected {[WEIGHTS, CONFIG, TOKENIZER]} "
            "(write one with `dream-fast export --checkpoint RUN_DIR --out DIR`)"
        )
    cfg = config_from_dict(yaml.safe_load((d / CONFIG).read_text()))
    tokenizer = BPETokenizer.from_file(d / TOKENIZER)
    model = build_model(cfg.model, cfg.loss)
    state = load_file(str(d / WEIGHTS))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{d / WEIGHTS} does not match its config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model = model.to(device=device, dtype=dtype).eval()
    return Pretrained(model, cfg, tokenizer)
