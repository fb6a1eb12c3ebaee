"""Contrastive side: StableRep projection MLP and symmetric InfoNCE over the global batch.

Features are all-gathered WITH gradient across ranks; samples whose visible fraction is below the
threshold are excluded as queries and as negatives, without any host sync.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class StableRepProjection(nn.Module):
    """D -> hidden -> hidden -> out with BatchNorm + ReLU between layers (SyncBN when distributed)."""

    def __init__(self, dim: int, hidden: int = 1024, out: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.net(x_BD)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's slice."""
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def clip_loss(img_BE: torch.Tensor, txt_BE: torch.Tensor, valid_B: torch.Tensor, logit_scale: torch.Tensor,
              logit_scale_max: float = math.log(100.0)) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features over the global batch.

    Every rank computes the same global loss (cheap: (W B)^2 logits); the all-gather's backward sums
    the ranks' gradients and the data-parallel average divides by W, so parameters get exactly the
    gradient of the single-process loss on the concatenated batch. Invalid samples are removed from
    the softmax denominators (as negatives) and from the average (as queries); with no valid sample
    the loss is 0 with zero gradients.
    """
    img = gather_with_grad(F.normalize(img_BE.float(), dim=-1))
    txt = gather_with_grad(F.normalize(txt_BE.float(), dim=-1))
    valid = gather_no_grad(valid_B.to(img.device, torch.bool))
    scale = logit_scale.float().clamp(max=logit_scale_max).exp()
    logits = scale * img @ txt.t()
    neg = torch.finfo(logits.dtype).min / 4  # finite, so an all-invalid batch gives 0 and not NaN
    col_ok = valid[None, :]
    targets = torch.arange(logits.shape[0], device=logits.device)
    ce_i2t = F.cross_entropy(logits.masked_fill(~col_ok, neg), targets, reduction="none")
    ce_t2i = F.cross_entropy(logits.t().masked_fill(~col_ok, neg), targets, reduction="none")
    w = valid.float()
    return ((ce_i2t + ce_t2i) * 0.5 * w).sum() / w.sum().clamp(min=1.0)
