"""Text side: the CLIP-style contrastive text tower, the frozen T5 conditioner, the text aligner.

The tower is trained from scratch and pooled at the end-of-text token; the aligner turns any
text features (T5, precomputed, or the tower's) into decoder-width keys/values.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dream_fast.model.blocks import LN_EPS, Block, run_blocks


class TextTower(nn.Module):
    """Causal transformer over BPE ids -> (projected pooled embedding, hidden states, key mask)."""

    def __init__(self, vocab_size: int, context: int, width: int, depth: int, heads: int, proj_dim: int,
                 backend: str = "auto"):
        super().__init__()
        self.context = context
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, 4 * width, causal=True, backend=backend) for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width, eps=LN_EPS)
        self.text_projection = nn.Linear(width, proj_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids_BT: torch.Tensor, eot_id: torch.Tensor | int, grad_ckpt: bool = False):
        if ids_BT.shape[1] != self.context:
            raise ValueError(f"text ids have length {ids_BT.shape[1]}, the tower's context is {self.context}")
        x = self.token_embedding(ids_BT) + self.positional_embedding
        x = self.ln_final(run_blocks(self.blocks, x, grad_ckpt=grad_ckpt))
        # first end-of-text position (argmax of a 0/1 int tensor: no host sync)
        eot_idx_B = (ids_BT == eot_id).int().argmax(dim=1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_idx_B]
        key_mask_BT = torch.arange(self.context, device=x.device)[None, :] <= eot_idx_B[:, None]
        return self.text_projection(pooled), x, key_mask_BT


class TextAligner(nn.Module):
    """Linear(E -> D) + learned text pos-emb -> LN -> self-attention blocks at decoder width -> LN.

    The closing LayerNorm (as every pre-norm stack here ends with one) bounds the keys and values the
    decoder's cross-attention sees: without it the residual stream grew to norms of ~150 on the tiny
    preset, the cross-attention saturated on the background word and the decoder ignored the shape's
    colour and position words (measured: identical loss with a wrong colour in the caption).
    """

    def __init__(self, in_dim: int, length: int, width: int, depth: int, heads: int, mlp_hidden: int,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        self.pos = nn.Parameter(torch.zeros(length, width))
        self.ln = nn.LayerNorm(width, eps=LN_EPS)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_hidden, attn_drop, proj_drop, backend=backend) for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(width, eps=LN_EPS)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, text_BTE: torch.Tensor, mask_BT: torch.Tensor, grad_ckpt: bool = False) -> torch.Tensor:
        x = self.ln(self.proj(text_BTE) + self.pos[: text_BTE.shape[1]])
        return self.out_norm(run_blocks(self.blocks, x, mask_BT, grad_ckpt=grad_ckpt))


class T5Conditioner:
    """Frozen T5 encoder from a local directory -> (last hidden state (B, T, E), mask (B, T)).

    Kept outside the DREAM nn.Module: it is frozen and large, and never part of checkpoints.
    """

    def __init__(self, path: str, max_len: int = 128, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        p = Path(path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"T5 directory {str(p)!r} has no config.json; expected a transformers T5EncoderModel "
                "directory with its tokenizer files (e.g. a local copy of google/t5-v1_1-large)"
            )
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(p))
        self.model = T5EncoderModel.from_pretrained(str(p), torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.max_len, self.device = max_len, device
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask
