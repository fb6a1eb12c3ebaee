"""Exponential moving average of the weights (decay 0.9999, every optimizer step), ZeRO-3 aware.

ZeRO 0/1/2 and the torch engine keep a full fp32 copy per rank. Under ZeRO-3 each rank keeps the
EMA of its own flat partition only (`param.ds_tensor`, same layout as DeepSpeed's: contiguous
chunks of the flattened parameter, zero padded) -- no gather per step; checkpoints and exports
all-gather the shards once into full tensors, and resume slices them again (so the world size may
change between save and resume).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class EMA:
    def __init__(self, sources: list[tuple[str, torch.Tensor]], decay: float,
                 zero3_layout: dict[str, tuple[torch.Size, int, int]] | None = None):
        """sources: (name, tensor) pairs read after every step (full params or ZeRO-3 partitions)."""
        self.decay = decay
        self.names = [n for n, _ in sources]
        self.sources = [t for _, t in sources]
        self.layout = zero3_layout
        self.shadow = [t.detach().float().clone() for t in self.sources]

    @torch.no_grad()
    def update(self) -> None:
        src = [t.detach().float() if t.dtype != torch.float32 else t.detach() for t in self.sources]
        torch._foreach_lerp_(self.shadow, src, 1.0 - self.decay)

    # ---- full tensors -----------------------------------------------------------------------------

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 EMA tensor} on CPU; a collective under ZeRO-3 (call on every rank)."""
        if self.layout is None:
            return {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}
        flat = torch.cat([s.reshape(-1) for s in self.shadow])
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for n in self.names:
            shape, numel, psize = self.layout[n]
            whole = torch.cat([p[offset : offset + psize] for p in parts])[:numel]
            out[n] = whole.reshape(shape).cpu().clone()
            offset += psize
        return out

    @torch.no_grad()
    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        rank = dist.get_rank() if self.layout is not None else 0
        for i, n in enumerate(self.names):
            value = state[n].float()
            if self.layout is None:
                self.shadow[i].copy_(value.reshape(self.shadow[i].shape))
                continue
            _, numel, psize = self.layout[n]
            flat = torch.zeros(psize * dist.get_world_size(), dtype=torch.float32)
            flat[:numel] = value.reshape(-1)
            self.shadow[i].copy_(flat[rank * psize : (rank + 1) * psize])
