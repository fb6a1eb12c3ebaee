"""Transformer building blocks shared by the encoder, decoder, text tower and text aligner.

Pre-norm ViT blocks (qkv bias, LN eps 1e-6) and a decoder block with cross-attention to text;
all attention goes through `attention.attention` in the (B, L, H, Dh) layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dream_fast.model.attention import attention

LN_EPS = 1e-6


class Mlp(nn.Module):
    """Linear -> GELU -> Linear with dropout after each projection."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 causal: bool = False, backend: str = "auto"):
        super().__init__()
        self.heads, self.causal, self.backend, self.attn_drop = heads, causal, backend, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BLD: torch.Tensor, key_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        drop = self.attn_drop if self.training else 0.0
        o = attention(q, k, v, key_mask_BL, self.causal, drop, self.backend)
        return self.proj_drop(self.proj(o.reshape(B, L, D)))


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from text tokens (same width)."""

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.heads, self.backend, self.attn_drop = heads, backend, attn_drop
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BLD: torch.Tensor, ctx_BTD: torch.Tensor, ctx_mask_BT: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x_BLD.shape
        T = ctx_BTD.shape[1]
        q = self.q(x_BLD).view(B, L, self.heads, D // self.heads)
        k, v = self.kv(ctx_BTD).view(B, T, 2, self.heads, D // self.heads).unbind(2)
        drop = self.attn_drop if self.training else 0.0
        o = attention(q, k, v, ctx_mask_BT, False, drop, self.backend)
        return self.proj_drop(self.proj(o.reshape(B, L, D)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, causal: bool = False, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads, attn_drop, proj_drop, causal, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden, proj_drop)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Decoder block: self-attention -> cross-attention to text -> MLP, each pre-norm."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads, attn_drop, proj_drop, False, backend)
        self.norm_x = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross = CrossAttention(dim, heads, attn_drop, proj_drop, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden, proj_drop)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm_x(x), ctx, ctx_mask)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, grad_ckpt: bool = False) -> torch.Tensor:
    """Apply blocks in order, optionally with activation checkpointing in training."""
    for blk in blocks:
        if grad_ckpt and torch.is_grad_enabled():
            x = checkpoint(blk, x, *args, use_reentrant=False)
        else:
            x = blk(x, *args)
    return x
