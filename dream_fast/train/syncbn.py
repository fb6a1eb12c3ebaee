"""Batch statistics over every rank's micro-batch (SyncBatchNorm) for the StableRep projection.

torch's SyncBatchNorm refuses CPU tensors, so CPU/gloo runs use `GlobalBatchNorm1d`: the same
math with differentiable all-reduces; CUDA runs use torch's own kernel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the concatenated global batch (N, C).

    Gradients flow through the all-reduced sums, so with the data-parallel gradient average the
    parameters get exactly the gradient of a single process seeing the whole batch.
    """

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x_NC)
        from torch.distributed.nn.functional import all_reduce

        if x_NC.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d expects (N, C) inputs, got {tuple(x_NC.shape)}")
        xf = x_NC.float()
        n_local = torch.tensor([float(x_NC.shape[0])], device=x_NC.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), n_local])
        stats = all_reduce(stats)  # one collective: sum, sum of squares, count
        C = x_NC.shape[1]
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C : 2 * C] / n - mean * mean).clamp(min=0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp(min=1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x_NC.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm with its synchronised form (torch's on CUDA, ours elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        out = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out

