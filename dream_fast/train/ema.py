"""Exponential moving average of the weights (decay 0.9999, every optimizer step), read from fp32.

The EMA follows the weights the optimizer steps in fp32 -- ZeRO's and the bf16 optimizer's fp32 master
copies, not the bf16 weights the forward reads (an EMA of bf16-rounded weights drifts by their rounding,
and reading them would cost a full-size fp32 temporary every step). Each rank averages only the pieces of
the masters it owns (`Shard`s: one per parameter fragment), so under ZeRO 1/2/3 and the bf16 optimizer the
EMA is sharded like the optimizer (4 bytes per parameter / world size), and an update is one foreach lerp
over views, with no copy. Only rank 0 assembles full tensors -- at checkpoint and export, a bounded chunk
of parameters at a time; resume slices each rank's pieces out of the full tensors again, so the world size
may change between save and resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

GATHER_CHUNK = 1 << 26  # elements (256 MB of fp32) moved to rank 0 per collective when assembling


@dataclass
class Shard:
    """The piece of one parameter this rank averages: `source` (a 1-D view that the optimizer
    updates in place, fp32 wherever a master copy exists) holds elements [start, start + numel)
    of the flattened full parameter `name` of shape `shape`."""

    name: str
    shape: torch.Size
    start: int
    source: torch.Tensor

    @property
    def numel(self) -> int:
        return self.source.numel()


def full_shards(named: list[tuple[str, torch.Tensor]]) -> list[Shard]:
    """Whole parameters as shards (one process, DDP, or DeepSpeed without masters)."""
    return [Shard(n, p.shape, 0, p.detach().reshape(-1)) for n, p in named]


class EMA:
    def __init__(self, shards: list[Shard], sharded: bool = False, *, decay: float):
        """shards: this rank's pieces; sharded: the pieces of one parameter are spread over the ranks."""
        self.decay = decay
        self.shards = shards
        self.sharded = sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.shadow = [s.source.detach().float().clone() for s in shards]
        self._fp32 = all(s.source.dtype == torch.float32 for s in shards)
        # every rank's layout, once: [(name, shape, start, numel)] per rank, in shard order
        mine = [(s.name, tuple(s.shape), s.start, s.numel) for s in shards]
        if self.sharded:
            self.layouts: list[list[tuple]] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(self.layouts, mine)
        else:
            self.layouts = [mine]

    def numel(self) -> int:
        """Elements this rank holds (its share of the model when sharded)."""
        return sum(s.numel() for s in self.shadow)

    @torch.no_grad()
    def update(self) -> None:
        src = [s.source.detach() for s in self.shards]
        if not self._fp32:
            src = [t.float() for t in src]
        torch._foreach_lerp_(self.shadow, src, 1.0 - self.decay)

    # ---- full tensors -----------------------------------------------------------------------------

    @torch.no_grad()
    def full(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 EMA tensor} on CPU, on rank 0 ({} on the other ranks); a collective when
        sharded (call on every rank)."""
        if not self.sharded:
            return {s.name: t.detach().reshape(s.shape).cpu().clone() for s, t in zip(self.shards, self.shadow)}
        rank, world = dist.get_rank(), dist.get_world_size()
        names = list(dict.fromkeys(n for lay in self.layouts for n, *_ in lay))  # first-seen order
        shapes = {n: torch.Size(shape) for lay in self.layouts for n, shape, *_ in lay}
        out = {n: torch.zeros(shapes[n].numel(), dtype=torch.float32) for n in names} if rank == 0 else {}
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        for chunk in _chunks(names, {n: shapes[n].numel() for n in names}, GATHER_CHUNK):
            wanted = set(chunk)
            flat = [t for s, t in zip(self.shards, self.shadow) if s.name in wanted]  # in this rank's layout order
            sizes = [sum(k for n, _, _, k in lay if n in wanted) for lay in self.layouts]
            send = torch.zeros(max(sizes), dtype=torch.float32, device=device)
            if flat:
                local = torch.cat(flat)
                send[: local.numel()] = local
            bufs = [torch.empty_like(send) for _ in range(world)] if rank == 0 else None
            dist.gather(send, bufs, dst=0)
            if rank != 0:
                continue
            for r, lay in enumerate(self.layouts):
                got, offset = bufs[r].cpu(), 0
                for n, _, start, k in lay:
                    if n in wanted:
                        out[n][start : start + k] = got[offset : offset + k]
                        offset += k
        return {n: v.reshape(shapes[n]) for n, v in out.items()}

    @torch.no_grad()
    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's pieces from full tensors (as `full` returns them), on any world size."""
        missing = sorted({s.name for s in self.shards} - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for s, t in zip(self.shards, self.shadow):
            value = state[s.name].float().reshape(-1)
            if value.numel() != s.shape.numel():
                raise ValueError(f"EMA state has {value.numel()} elements for {s.name}, the model {s.shape.numel()}")
            t.copy_(value[s.start : s.start + s.numel])


def _chunks(names: list[str], numels: dict[str, int], cap: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    total = 0
    for n in names:
        if out[-1] and total + numels[n] > cap:
            out.append([])
            total = 0
        out[-1].append(n)
        total += numels[n]
    return out
