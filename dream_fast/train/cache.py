"""`dream-fast cache`: pre-extract VAE posterior moments (image and its flip), BPE ids and T5
embeddings (fp16) into new shards, and the reader that trains from them.

One output shard per input shard (cache-00012.tar from input #12), split over ranks (i % world ==
rank), each written under a temporary name and renamed: a rerun skips finished shards (resumable).
Members per sample: {key}.moments.npy, {key}.moments_flip.npy (fp16 (2c, h, w)), {key}.ids.npy
(int32 (T,)), {key}.t5.npy (fp16 (n_valid, E), only with T5), {key}.txt. Next to the shards:
cache_meta.json, tokenizer.json, empty_text.safetensors (T5 of the empty caption). Training from
the cache needs neither the VAE nor T5; arrays are read with allow_pickle=False.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dream_fast.config import ConfigError, DreamConfig
from dream_fast.data.shards import PositionedSamples, expand_urls, seed_int

log = logging.getLogger(__name__)

META = "cache_meta.json"
_STATS = ("samples", "skipped_samples", "skipped_shards")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


CACHE_FILES = (META, "tokenizer.json", "empty_text.safetensors")


def read_cache_meta(shards: str, local_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], Path, list[str]]:
    """(meta, directory holding the cache's side files, shard urls) for a cache shard pattern, a cache
    directory, or remote shards (URLs / `pipe:` commands).

    Remote shards: cache_meta.json, tokenizer.json and empty_text.safetensors are fetched the way the
    first shard is (its file name replaced in the URL or command) into `local_dir` (atomically, so
    ranks sharing it never read half a file); the meta must hold num_samples (a finished cache)."""
    from dream_fast.data.shards import is_remote

    p = Path(shards)
    if not is_remote(str(shards)) and p.is_dir():
        urls = sorted(str(u) for u in p.glob("cache-*.tar"))
        cache_dir = p
    else:
        urls = expand_urls(shards)
        if is_remote(urls[0]):
            return _fetch_remote_meta(urls, local_dir)
        cache_dir = Path(urls[0]).parent
    if not (cache_dir / META).is_file():
        raise ConfigError(f"data.shards: {cache_dir} has no {META}; is it the output of `dream-fast cache`?")
    if not urls:
        raise ConfigError(f"data.shards: no cache-*.tar shards in {cache_dir}")
    meta = json.loads((cache_dir / META).read_text())
    if not meta.get("num_samples"):  # not finalized yet: count from the per-shard files
        meta["num_samples"] = sum(json.loads(c.read_text())["count"] for c in cache_dir.glob("cache-*.json"))
    return meta, cache_dir, urls


def _fetch_remote_meta(urls: list[str], local_dir: str | os.PathLike | None) -> tuple[dict[str, Any], Path, list[str]]:
    import tempfile

    from dream_fast.data.shards import read_url_bytes, sibling_url

    out = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="dream_cache_"))
    out.mkdir(parents=True, exist_ok=True)
    for name in CACHE_FILES:
        src = sibling_url(urls[0], name)
        try:
            data = read_url_bytes(src)
        except FileNotFoundError as e:
            if name == "empty_text.safetensors":
                continue  # a cache without T5 has none
            raise ConfigError(f"data.shards: cannot fetch the cache's {name} from {src!r} (next to the first shard, "
                              f"the same way): {e}. Upload the whole `dream-fast cache` output directory, "
                              f"{name} included") from None
        tmp = out / f".{name}.tmp{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, out / name)
    return json.loads((out / META).read_text()), out, urls  # num_samples: written when the cache was finished


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class CacheShards(IterableDataset):
    """Samples {"moments", "moments_flip", "ids", ("t5", "t5_mask")} from cache shards.

    Shards are split over ranks, then DataLoader workers (a sample modulo filter when there are
    fewer shards than readers); shard order and the shuffle buffer are seeded by (seed, epoch).
    Bad samples and broken shards are skipped and counted in `.stats` (shared memory)."""

    def __init__(
        self,
        urls: list[str],
        t5_len: int = 128,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
    ):
        super().__init__()
        self.urls, self.t5_len = list(urls), t5_len
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.rank, self.world_size = rank, world_size
        self._counts = torch.zeros(256, len(_STATS), dtype=torch.long).share_memory_()
        self.pos_every, self.worker_shift = 0, 0  # as ImageTextShards: reader positions for resume
        self.resume_positions: dict[int, dict[str, Any]] = {}

    def set_resume(self, positions: dict[int, dict[str, Any]] | None, worker_shift: int = 0) -> None:
        self.resume_positions, self.worker_shift = dict(positions or {}), worker_shift

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def stats(self) -> dict[str, int]:
        return dict(zip(_STATS, (int(v) for v in self._counts.sum(0).tolist())))

    def _bump(self, worker: int, name: str) -> None:
        if worker < self._counts.shape[0]:
            self._counts[worker, _STATS.index(name)] += 1

    def _decode(self, group: dict[str, bytes | None]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "moments": torch.from_numpy(_npy(group["moments.npy"]).astype(np.float16)),
            "moments_flip": torch.from_numpy(_npy(group["moments_flip.npy"]).astype(np.float16)),
            "ids": torch.from_numpy(_npy(group["ids.npy"]).astype(np.int64)),
        }
        if group.get("t5.npy") is not None:
            t5 = torch.from_numpy(_npy(group["t5.npy"]).astype(np.float16))
            n = min(t5.shape[0], self.t5_len)
            emb = torch.zeros(self.t5_len, t5.shape[1], dtype=torch.float16)
            emb[:n] = t5[:n]
            mask = torch.zeros(self.t5_len, dtype=torch.bool)
            mask[:n] = True
            out["t5"], out["t5_mask"] = emb, mask
        if out["moments"].shape != out["moments_flip"].shape:
            raise ValueError("moments and moments_flip differ in shape")
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, workers = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (wid + self.worker_shift) % workers
        urls = list(self.urls)
        if self.shuffle_buffer > 1:
            order = np.random.default_rng(seed_int(self.seed, self.epoch)).permutation(len(urls))
            urls = [urls[i] for i in order]
        filters = []
        for part, parts in ((self.rank, self.world_size), (worker, workers)):
            if parts > 1:
                if len(urls) >= parts:
                    urls = urls[part::parts]
                else:
                    filters.append((parts, part))
        rng = random.Random(seed_int(self.seed, self.epoch, self.rank, worker))

        def on_error(url: str, reason: str) -> None:
            self._bump(worker, "skipped_shards")
            log.warning("skipping the rest of cache shard %s: %s", url, reason)

        stream = PositionedSamples(urls, filters, on_error, self.shuffle_buffer, rng, self.resume_positions.get(worker))
        n = 0
        for _, _, group in stream:
            try:
                sample = self._decode(group)
            except Exception as e:  # noqa: BLE001 - a bad sample is counted, never fatal
                self._bump(worker, "skipped_samples")
                log.debug("skipping a cache sample: %s", e)
                continue
            self._bump(worker, "samples")
            n += 1
            if self.pos_every and n % self.pos_every == 0:
                sample["_pos"] = {"reader": worker, "readers": workers, "epoch": self.epoch, "at": stream.state()}
            yield sample


def cache_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def build_cache(
    cfg: DreamConfig,
    shards: str,
    out_dir: str | os.PathLike,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Write this rank's share of the cache; returns {"written", "skipped", "samples"}."""
    from dream_fast.data.bpe import BPETokenizer
    from dream_fast.data.shards import iter_captions
    from dream_fast.model.image_tokenizer import build_image_tokenizer

    m = cfg.model
    if m.tokenizer != "vae":
        raise ConfigError("dream-fast cache stores VAE moments: set model.tokenizer: vae and model.vae_path")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_urls(shards)
    tok_path = out / "tokenizer.json"
    if cfg.data.tokenizer_path:
        if rank == 0:
            shutil.copy2(cfg.data.tokenizer_path, tok_path)
    elif rank == 0 and not tok_path.is_file():
        BPETokenizer.train(iter_captions(urls), min(m.vocab_size, 49408), save_path=tok_path)
    _wait_for(tok_path)
    tok = BPETokenizer.from_file(tok_path)
    vae = build_image_tokenizer(m).to(device)
    t5 = None
    if m.t5_path:
        from dream_fast.model.text import T5Conditioner

        t5 = T5Conditioner(m.t5_path, m.t5_len, device=device)
    if rank == 0:
        if t5 is not None:
            from safetensors.torch import save_file

            emb, mask = t5([""])
            n = int(mask[0].sum())
            save_file({"emb": emb[0, :n].half().cpu().contiguous()}, str(out / "empty_text.safetensors"))
        meta = {"img_size": m.img_size, "vae_path": m.vae_path, "vae_channels": vae.channels,
                "vae_stride": m.vae_stride, "vae_scale": m.vae_scale, "text_context": m.text_context,
                "t5_path": m.t5_path, "t5_len": m.t5_len, "t5_dim": (t5.dim if t5 else None),
                "num_shards": len(urls), "source": shards}  # fmt: skip
        (out / META).write_text(json.dumps(meta, indent=1))
    written = skipped = samples = 0
    mine = [(i, u) for i, u in enumerate(urls) if i % world_size == rank]
    for i, url in mine:
        dst = out / f"cache-{i:05d}.tar"
        if dst.is_file() and (out / f"cache-{i:05d}.json").is_file():
            skipped += 1
            continue
        n = _cache_shard(url, dst, vae, t5, tok, m.img_size, m.text_context, batch_size, device)
        (out / f"cache-{i:05d}.json").write_text(json.dumps({"count": n, "source": url}))
        written += 1
        samples += n
        if progress:
            log.info("cache: %s -> %s (%d samples)", url, dst.name, n)
    if world_size == 1:
        finalize_meta(out)
    return {"written": written, "skipped": skipped, "samples": samples}


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    import time

    t0 = time.monotonic()
    while not path.is_file():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {path} (written by rank 0)")
        time.sleep(0.5)


@torch.no_grad()
def _cache_shard(url: str, dst: Path, vae, t5, tok, img_size: int, context: int, batch_size: int, device) -> int:
    from dream_fast.data.shards import ImageTextShards, collate

    ds = ImageTextShards(
        [url], img_size=img_size, hflip=False, tokenizer=tok, context=context, shuffle_buffer=0, rank=0, world_size=1
    )
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    count = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            batch: list[dict[str, Any]] = []

            def flush() -> int:
                b = collate(batch)
                images = b["image"].to(device)
                mom = vae.moments(images).half().cpu().numpy()
                mom_f = vae.moments(images.flip(-1)).half().cpu().numpy()
                emb = mask = None
                if t5 is not None:
                    emb, mask = t5(b["caption"])
                for j, key in enumerate(b["key"]):
                    _add(tf, f"{key}.moments.npy", _npy_bytes(mom[j]))
                    _add(tf, f"{key}.moments_flip.npy", _npy_bytes(mom_f[j]))
                    _add(tf, f"{key}.ids.npy", _npy_bytes(b["ids"][j].numpy().astype(np.int32)))
                    if emb is not None:
                        n = int(mask[j].sum())
                        _add(tf, f"{key}.t5.npy", _npy_bytes(emb[j, :n].half().cpu().numpy()))
                    _add(tf, f"{key}.txt", b["caption"][j].encode("utf-8"))
                return len(b["key"])

            for sample in ds:
                batch.append(sample)
                if len(batch) == batch_size:
                    count += flush()
                    batch = []
            if batch:
                count += flush()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    if ds.stats["skipped_samples"] or ds.stats["skipped_shards"]:
        log.warning(
            "cache: %s: skipped %d samples, %d broken shard reads",
            url,
            ds.stats["skipped_samples"],
            ds.stats["skipped_shards"],
        )
    return count


def finalize_meta(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Sum the per-shard counts into cache_meta.json (rank 0, after every rank finished)."""
    out = Path(out_dir)
    meta = json.loads((out / META).read_text())
    counts = [json.loads(p.read_text())["count"] for p in sorted(out.glob("cache-*.json"))]
    meta["num_samples"] = int(sum(counts))
    meta["complete"] = len(counts) == meta["num_shards"]
    (out / META).write_text(json.dumps(meta, indent=1))
    return meta


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (model.vae_path, model.t5_path, sizes)")
    parser.add_argument("--shards", default=None, help="input image-text shards (default: data.shards)")
    parser.add_argument("--out", required=True, help="output directory for the cache shards")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")


def main(args: argparse.Namespace) -> int:
    from dream_fast.config import load_config

    cfg = load_config(args.config, args.overrides)
    shards = args.shards or cfg.data.shards
    if not shards:
        raise ConfigError("give --shards or data.shards: the image-text shards to cache")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    res = build_cache(cfg, shards, args.out, args.batch_size, rank, world, device, progress=True)
    print(f"rank {rank}: wrote {res['written']} shards ({res['samples']} samples), {res['skipped']} already done")
    if rank == 0:
        # other ranks may still be writing: wait for every shard's count file
        n = json.loads((Path(args.out) / META).read_text())["num_shards"]
        for i in range(n):
            _wait_for(Path(args.out) / f"cache-{i:05d}.json", timeout_s=7 * 24 * 3600)
        meta = finalize_meta(args.out)
        print(f"cache {args.out}: {meta['num_samples']} samples in {meta['num_shards']} shards")
    return 0
