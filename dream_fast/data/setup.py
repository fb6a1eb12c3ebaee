"""Build the training stream, the BPE tokenizer and the empty-caption text for one rank.

shapes: shards written on first use (rank 0), decoded once into memory; webdataset: img2dataset
shards streamed; cache: shards of `dream-fast cache` (VAE moments, BPE ids, T5 embeddings).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dream_fast.config import ConfigError, DreamConfig
from dream_fast.data.bpe import BPETokenizer
from dream_fast.data.streams import InMemoryStream, LoaderStream, decode_shards_u8
from dream_fast.dist import DistInfo, all_reduce_max, barrier

log = logging.getLogger(__name__)

# Above this many decoded bytes the shapes set is streamed from its shards instead of held in memory.
IN_MEMORY_LIMIT = 2 * 2**30


@dataclass
class TrainData:
    stream: Any  # InMemoryStream | LoaderStream
    tokenizer: BPETokenizer
    tokenizer_path: Path
    epoch_size: int
    empty_text: tuple[torch.Tensor, torch.Tensor] | None  # (emb_TE, mask_T) for text_cond t5/precomputed


def check_data_config(cfg: DreamConfig, world_size: int = 1) -> None:
    """Problems we can see before any work starts."""
    d, m = cfg.data, cfg.model
    if (world_size > 1 and d.source == "webdataset" and not d.tokenizer_path
            and not (Path(cfg.train.out_dir) / "tokenizer.json").is_file()):
        # Training it here would read every caption of every shard on rank 0 while the other ranks wait in a
        # barrier that outlasts train.dist_timeout_s (docs/training.md, "Running at scale").
        raise ConfigError(f"a {world_size}-rank run on data.source=webdataset needs data.tokenizer_path: train the "
                          f"tokenizer once before the launch, e.g. `dream-fast tokenizer --shards \"{d.shards}\" "
                          f"--vocab-size {min(m.vocab_size, 49408)} --out tok.json`, then set "
                          "data.tokenizer_path=tok.json (or run one single-process step in this out_dir first)")
    if d.source in ("webdataset", "cache") and not d.shards:
        raise ConfigError(f"data.source is {d.source!r} but data.shards is not set; give a shard pattern "
                          "such as /data/cc12m/{00000..01242}.tar")
    if d.source != "cache":
        if m.tokenizer == "vae" and not m.vae_path:
            raise ConfigError("model.tokenizer is 'vae' but model.vae_path is not set (a local diffusers "
                              "AutoencoderKL directory), and data.source is not 'cache'")
        if m.text_cond == "t5" and not m.t5_path:
            raise ConfigError("model.text_cond is 't5' but model.t5_path is not set (a local T5EncoderModel "
                              "directory), and data.source is not 'cache'")
        if m.text_cond == "precomputed":
            raise ConfigError("model.text_cond='precomputed' needs data.source: cache (embeddings come "
                              "from the cache shards)")
    elif m.tokenizer != "vae":
        raise ConfigError("data.source='cache' holds VAE moments: set model.tokenizer: vae")
    if d.tokenizer_path and not Path(d.tokenizer_path).is_file():
        raise ConfigError(f"data.tokenizer_path: {d.tokenizer_path!r} does not exist")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")


def _vocab_digest(tok: BPETokenizer) -> int:
    import zlib

    return zlib.crc32(json.dumps(tok.tokenizer.get_vocab(), sort_keys=True).encode())


def _tokenizer(cfg: DreamConfig, out_dir: Path, info: DistInfo, captions_fn) -> tuple[BPETokenizer, Path]:
    """data.tokenizer_path, else out_dir/tokenizer.json (reused on resume), else trained on the captions.

    One rank: trained here. Several ranks (in-memory shapes captions only; check_data_config refuses
    streamed captions): every rank trains the same tokenizer itself, so no rank waits behind a
    barrier, and one collective checks that all ranks got the same vocabulary; rank 0 saves it."""
    if cfg.data.tokenizer_path:
        path = Path(cfg.data.tokenizer_path)
    else:
        path = out_dir / "tokenizer.json"
        exists = float(path.is_file())
        if info.world_size > 1:  # decided together, before any rank can write it
            exists = -all_reduce_max(-exists, info.device)
        if not exists:
            vocab = min(cfg.model.vocab_size, 49408)
            log.info("training a BPE tokenizer (vocab <= %d) on the training captions -> %s", vocab, path)
            tok = BPETokenizer.train(captions_fn(), vocab)
            if info.world_size > 1:
                h = float(_vocab_digest(tok))
                if all_reduce_max(h, info.device) != -all_reduce_max(-h, info.device):
                    raise RuntimeError("the ranks trained different BPE tokenizers from the same captions; train it "
                                       "once (`dream-fast tokenizer`) and set data.tokenizer_path")
            if info.is_main:
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                tok.save(tmp)
                os.replace(tmp, path)  # another rank may read it at any time: never half-written
            barrier()  # every rank trained already: this waits for rank 0's rename only
            return _check_vocab(cfg, tok, path), path
    return _check_vocab(cfg, BPETokenizer.from_file(path), path), path


def _check_vocab(cfg: DreamConfig, tok: BPETokenizer, path: Path) -> BPETokenizer:
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer {path} has {tok.vocab_size} tokens, more than model.vocab_size="
                          f"{cfg.model.vocab_size}; raise model.vocab_size or use a smaller tokenizer")
    return tok


def _shapes(cfg: DreamConfig, out_dir: Path, info: DistInfo) -> TrainData:
    from dream_fast.data.shapes import scene_key, shard_pattern, write_shapes_shards

    d, m = cfg.data, cfg.model
    shapes_dir = Path(d.shapes_dir)
    if info.is_main:
        write_shapes_shards(shapes_dir, d.shapes_num_train, d.shapes_num_val, d.shapes_num_val, seed=d.shapes_seed,
                            img_size=m.img_size, progress=False)
    barrier()
    urls = shard_pattern(shapes_dir, "train")
    images, captions, stats = decode_shards_u8(urls, m.img_size)
    if images.nbytes > IN_MEMORY_LIMIT:
        raise ConfigError(f"the shapes train set is {images.nbytes / 2**30:.1f} GiB decoded; use fewer "
                          "samples or write it as shards and train with data.source: webdataset")
    tok, tok_path = _tokenizer(cfg, out_dir, info, lambda: captions)
    ids = tok.encode(captions, m.text_context)
    keys = [scene_key(c) for c in captions] if d.shapes_group_size > 1 else None
    stream = InMemoryStream(images, ids, captions, cfg.train.batch_size, cfg.train.seed, info.rank,
                            info.world_size, stats, group_keys=keys, group_size=d.shapes_group_size)
    if stats["skipped_samples"] or stats["skipped_shards"]:
        log.warning("shapes data: skipped %d samples and %d shards", stats["skipped_samples"], stats["skipped_shards"])
    return TrainData(stream, tok, tok_path, stream.epoch_size, None)


def _webdataset(cfg: DreamConfig, out_dir: Path, info: DistInfo) -> TrainData:
    from dream_fast.data.shards import ImageTextShards, count_samples, expand_urls, iter_captions

    d, m = cfg.data, cfg.model
    urls = expand_urls(d.shards)
    try:  # before the tokenizer: a remote data set without a count fails at once
        epoch_size = d.epoch_size or count_samples(urls)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tok, tok_path = _tokenizer(cfg, out_dir, info, lambda: iter_captions(urls))
    ds = ImageTextShards(urls, img_size=m.img_size, hflip=d.hflip, tokenizer=tok, context=m.text_context,
                         shuffle_buffer=d.shuffle_buffer, seed=cfg.train.seed, rank=info.rank,
                         world_size=info.world_size)
    stream = LoaderStream(ds, cfg.train.batch_size, d.num_workers, epoch_size)
    empty = None
    if m.text_cond == "t5":
        from dream_fast.model.text import T5Conditioner

        t5 = T5Conditioner(m.t5_path, m.t5_len)
        emb, mask = t5([""])
        empty = (emb[0], mask[0])
        del t5
    return TrainData(stream, tok, tok_path, max(1, epoch_size), empty)


def _cache(cfg: DreamConfig, out_dir: Path, info: DistInfo) -> TrainData:
    from dream_fast.train.cache import CacheShards, cache_collate, read_cache_meta

    d, m = cfg.data, cfg.model
    meta, cache_dir, urls = read_cache_meta(d.shards, local_dir=out_dir / ".cache_files")
    for key, want in (("img_size", m.img_size), ("vae_channels", m.vae_channels), ("text_context", m.text_context)):
        if meta.get(key) is not None and meta[key] != want:
            raise ConfigError(f"the cache in {cache_dir} was made with {key}={meta[key]}, the config says {want}")
    if m.text_cond != "tower" and not meta.get("t5_dim"):
        raise ConfigError(f"the cache in {cache_dir} has no T5 embeddings, but model.text_cond={m.text_cond!r}")
    if m.text_cond != "tower" and meta["t5_dim"] != m.t5_dim:
        raise ConfigError(f"the cache's T5 width is {meta['t5_dim']}, model.t5_dim is {m.t5_dim}")
    tok_path = Path(d.tokenizer_path) if d.tokenizer_path else cache_dir / "tokenizer.json"
    tok = BPETokenizer.from_file(tok_path)
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(f"the cache tokenizer has {tok.vocab_size} tokens > model.vocab_size={m.vocab_size}")
    ds = CacheShards(urls, t5_len=m.t5_len, shuffle_buffer=d.shuffle_buffer, seed=cfg.train.seed,
                     rank=info.rank, world_size=info.world_size)
    epoch_size = d.epoch_size or int(meta.get("num_samples") or 0)
    if epoch_size < 1:
        raise ConfigError(f"the cache in {d.shards} has no sample count ({cache_dir / 'cache_meta.json'} has no "
                          "num_samples: finish the cache with `dream-fast cache`), or set data.epoch_size")
    stream = LoaderStream(ds, cfg.train.batch_size, d.num_workers, epoch_size, collate_fn=cache_collate)
    empty = None
    if m.text_cond != "tower":
        from safetensors.torch import load_file

        e = load_file(str(cache_dir / "empty_text.safetensors"))
        emb = torch.zeros(m.t5_len, m.t5_dim)
        mask = torch.zeros(m.t5_len, dtype=torch.bool)
        n = min(e["emb"].shape[0], m.t5_len)
        emb[:n], mask[:n] = e["emb"][:n].float(), True
        empty = (emb, mask)
    return TrainData(stream, tok, tok_path, epoch_size, empty)


def build_train_data(cfg: DreamConfig, out_dir: Path, info: DistInfo) -> TrainData:
    check_data_config(cfg)
    if cfg.data.source == "shapes":
        return _shapes(cfg, out_dir, info)
    if cfg.data.source == "webdataset":
        return _webdataset(cfg, out_dir, info)
    return _cache(cfg, out_dir, info)
