"""Training data streams (all resumable from a small per-rank position dict):
- InMemoryStream: the decoded shapes train set held as uint8 (fast enough for the tiny preset on
  2 cores), a permutation per (seed, epoch), split evenly over ranks so every rank sees the same
  number of batches;
- LoaderStream: a DataLoader over webdataset image-text shards or cache shards; resume starts each
  worker at its saved shard, offset and shuffle buffer (no replay of the epoch).
`dream_fast.train.inputs.InputMaker` turns a batch into model inputs on the device.
"""

from __future__ import annotations

import atexit
import io
import logging
import multiprocessing.util
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dream_fast.config import ConfigError
from dream_fast.data.shards import (
    IMAGE_EXTS,
    caption_of,
    ignore_stop_signals_in_worker,
    iter_raw_samples,
    stop_signals_blocked,
)
from dream_fast.data.transforms import Image, adm_center_crop  # PIL, imported on first use

log = logging.getLogger(__name__)


def decode_shards_u8(urls: list[str], img_size: int) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """All samples of the shards as uint8 (N, 3, S, S) + captions; bad samples/shards are skipped."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    stats = {"samples": 0, "skipped_samples": 0, "skipped_shards": 0}

    def on_error(url: str, reason: str) -> None:
        stats["skipped_shards"] += 1
        log.warning("skipping the rest of shard %s: %s", url, reason)

    for url in urls:
        for _, group in iter_raw_samples(url, on_error):
            ext = next((e for e in IMAGE_EXTS if group.get(e) is not None), None)
            text, _ = caption_of(group)
            try:
                if ext is None or text is None:
                    raise ValueError("no image or caption")
                with Image.open(io.BytesIO(group[ext])) as im:
                    im.load()
                    img = im.convert("RGB")
                if img.size != (img_size, img_size):
                    img = adm_center_crop(img, img_size)
                images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
                captions.append(text)
                stats["samples"] += 1
            except Exception:  # noqa: BLE001 - a bad sample is counted, never fatal
                stats["skipped_samples"] += 1
    if not images:
        raise ValueError(f"no decodable samples in {len(urls)} shard(s), e.g. {urls[:2]}")
    return np.stack(images), captions, stats


def group_runs(keys: list[str], captions: list[str], group_size: int, generator: torch.Generator) -> list[list[int]]:
    """Sample indices split into runs of up to `group_size` that share a key and have distinct captions
    (e.g. the same scene with a different shape: hard negatives for InfoNCE), in random order.

    Per key, each run takes one sample from each of the `group_size` captions with the most samples
    left, so runs are as full as the caption counts allow. Every sample is in exactly one run.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    by_key: dict[str, dict[str, list[int]]] = {}
    for i in torch.randperm(len(keys), generator=generator).tolist():
        by_key.setdefault(keys[i], {}).setdefault(captions[i], []).append(i)
    runs: list[list[int]] = []
    for lists in by_key.values():
        left = list(lists.values())
        while left:
            left.sort(key=len, reverse=True)
            runs.append([lst.pop() for lst in left[:group_size]])
            left = [lst for lst in left if lst]
    return [runs[k] for k in torch.randperm(len(runs), generator=generator).tolist()]


def grouped_order(keys: list[str], captions: list[str], group_size: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of range(N): the runs of group_runs laid end to end."""
    return torch.tensor([i for run in group_runs(keys, captions, group_size, generator) for i in run],
                        dtype=torch.long)


class InMemoryStream:
    """Batches of {"image_u8": (B,3,S,S) uint8, "ids": (B,T), "caption": [...]} from memory.

    group_keys + group_size > 1: batches are made of runs of samples that share a key (see
    grouped_order); each rank takes whole batches of one epoch order, round-robin.
    """

    def __init__(self, images_u8: np.ndarray, ids_NT: torch.Tensor, captions: list[str], batch_size: int,
                 seed: int, rank: int, world_size: int, stats: dict[str, int] | None = None,
                 group_keys: list[str] | None = None, group_size: int = 1):
        self.images = torch.from_numpy(images_u8)
        self.ids, self.captions = ids_NT, captions
        if group_keys is not None and len(group_keys) != len(captions):
            raise ValueError(f"{len(group_keys)} group keys for {len(captions)} samples")
        self.group_keys, self.group_size = group_keys, group_size
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.per_rank = len(captions) // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ConfigError(f"train.batch_size={batch_size} x {world_size} rank(s) exceeds the "
                              f"{len(captions)} training samples; lower train.batch_size or add data")
        self.epoch_size = len(captions)
        self.epoch, self.batch = 0, 0
        self.stats = stats or {}
        self._order: torch.Tensor | None = None

    def _rank_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        if self.group_keys is not None and self.group_size > 1:
            order = grouped_order(self.group_keys, self.captions, self.group_size, g)
            B = self.batch_size
            rows = order[: self.batches_per_epoch * self.world * B].reshape(-1, B)
            return rows[self.rank :: self.world].reshape(-1)
        perm = torch.randperm(len(self.captions), generator=g)[: self.per_rank * self.world]
        return perm[self.rank :: self.world]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._rank_order()
        idx = self._order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        self.batch += 1
        return {"image_u8": self.images[idx], "ids": self.ids[idx], "caption": [self.captions[i] for i in idx]}

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _shutdown_live_loaders() -> None:
    """At exit, before multiprocessing's own hook (atexit runs last-registered first): stop the workers
    of every live LoaderStream iterator the orderly way. Its hook would send each worker one SIGTERM,
    which our workers ignore (ignore_stop_signals_in_worker), and then wait for them for ever."""
    for it in list(_LIVE_ITERATORS):
        try:
            it._shutdown_workers()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


multiprocessing.util  # noqa: B018 - imported (its exit hook registered) before ours below
atexit.register(_shutdown_live_loaders)


class _PosCollate:
    """Collate that takes the readers' positions ("_pos", on a batch's last sample) off the samples and
    puts the last one on the batch (module-level class: picklable for spawned workers)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        pos = None
        for s in samples:
            pos = s.pop("_pos", pos)
        out = self.collate(samples)
        if pos is not None:
            out["_pos"] = pos
        return out


class LoaderStream:
    """Endless batches from a DataLoader over a dataset with set_epoch(); position = (epoch, batch) and,
    for datasets with reader positions (ImageTextShards, CacheShards), each worker's position after its
    last consumed batch: its shard, the sample offset in it, its shuffle buffer and generator.

    Resume (load_state) starts every worker at its saved position and the loader's round-robin at the
    worker after the last one consumed, so the resumed stream is the uninterrupted one, batch for batch,
    without re-reading the epoch up to the saved batch. Without positions (another number of workers,
    an older checkpoint, resampled shards) it replays the stream up to the saved batch."""

    def __init__(self, dataset: Any, batch_size: int, num_workers: int, epoch_size: int, collate_fn=None):
        from dream_fast.data.shards import collate

        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.collate = collate_fn or collate
        self.epoch_size = epoch_size
        self.epoch, self.batch = 0, 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._empty_epochs = 0
        self.positioned = hasattr(dataset, "set_resume") and not getattr(dataset, "resampled", False)
        if self.positioned:
            dataset.pos_every = batch_size
        self._readers = max(1, num_workers)
        self._pos: dict[int, dict[str, Any]] = {}  # reader -> position after its last consumed batch (this epoch)
        self._last: int | None = None  # the reader of the last consumed batch
        self._resume: dict[str, Any] | None = None  # positions to start the next loader from
        self.replayed = 0  # batches re-read to reach a saved position (0 when the positions were used)

    @property
    def stats(self) -> dict[str, int]:
        return dict(getattr(self.dataset, "stats", {}))

    def _start(self, skip: int) -> None:
        from torch.utils.data import DataLoader

        self.dataset.set_epoch(self.epoch)
        if self.positioned:
            r = self._resume
            if r is not None:
                self.dataset.set_resume(r["positions"], (r["last"] + 1) % self._readers if r["last"] is not None else 0)
                skip = 0
            else:
                self.dataset.set_resume(None, 0)
        self._resume = None
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=_PosCollate(self.collate), drop_last=True,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            worker_init_fn=ignore_stop_signals_in_worker)
        with stop_signals_blocked():  # workers start with SIGTERM/SIGUSR1 held until they ignore them
            self._it = iter(loader)
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(self._it)
        for _ in range(skip):  # no positions: replay the deterministic stream to the saved batch
            self._take(next(self._it))
            self.replayed += 1

    def _take(self, out: dict[str, Any]) -> dict[str, Any]:
        pos = out.pop("_pos", None)
        if pos is not None:
            self._pos[int(pos["reader"])] = pos["at"]
            self._last = int(pos["reader"])
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self._start(self.batch)
            try:
                out = self._take(next(self._it))
                self.batch += 1
                self._empty_epochs = 0
                return out
            except StopIteration:
                self._empty_epochs = 0 if self.batch else self._empty_epochs + 1
                if self._empty_epochs > 1:
                    raise ValueError("the training shards gave no complete batch in a whole epoch; check "
                                     "data.shards and train.batch_size") from None
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
                self._pos, self._last = {}, None

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = {"epoch": self.epoch, "batch": self.batch}
        if self.positioned and self.batch > 0:
            st["readers"] = self._readers
            st["last_reader"] = self._last
            st["positions"] = {str(k): v for k, v in self._pos.items()}
        return st

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch, self._it = int(state["epoch"]), int(state["batch"]), None
        self._pos, self._last, self._resume = {}, None, None
        if self.positioned and self.batch > 0 and "positions" in state:
            if int(state["readers"]) == self._readers:
                self._pos = {int(k): v for k, v in state["positions"].items()}
                self._last = state["last_reader"]
                self._resume = {"positions": dict(self._pos), "last": self._last}
            else:
                log.warning("resuming with %d data readers per rank from a checkpoint with %s: replaying %d "
                            "batches of epoch %d", self._readers, state["readers"], self.batch, self.epoch)
