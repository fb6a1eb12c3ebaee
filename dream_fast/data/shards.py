"""Reading image-text webdataset shards in img2dataset layout ({key}.jpg|png|webp, .txt, .json).

Splits shards across ranks and DataLoader workers, shuffles deterministically, and skips (counts,
logs) corrupt samples and broken shards instead of raising.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import random
import re
import signal
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dream_fast.data.bpe import BPETokenizer
from dream_fast.data.transforms import Image, preprocess  # PIL, imported on first use

log = logging.getLogger(__name__)

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_BLOCK = 512
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
STAT_NAMES: tuple[str, ...] = ("samples", "skipped_samples", "skipped_shards")
MAX_WORKERS = 256  # rows of the shared counter table (DataLoader workers per rank)


# --------------------------------------------------------------------------------------------
# URL expansion
# --------------------------------------------------------------------------------------------


def _split_top_level(spec: str, sep: str) -> list[str]:
    """Split on `sep` outside {...} braces (brace patterns contain commas of their own)."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def expand_urls(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Shard list from brace patterns (`a-{000..009}.tar`), comma or `::` separated lists,
    local globs (`dir/*.tar`, sorted) and lists of any of these. `pipe:` commands and remote
    URLs (with a scheme) are brace-expanded but never globbed or split on commas.

    Raises ValueError for an empty result or a glob matching no file.
    """
    from braceexpand import braceexpand

    if isinstance(spec, (str, os.PathLike)):
        items = [os.fspath(spec)]
    else:
        items = [os.fspath(s) for s in spec]
    out: list[str] = []
    for item in items:
        for part in item.split("::"):
            part = part.strip()
            if not part:
                continue
            remote = part.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", part)
            pieces = [part] if remote else [p.strip() for p in _split_top_level(part, ",") if p.strip()]
            for piece in pieces:
                for url in braceexpand(piece):
                    if not remote and any(c in url for c in "*?["):
                        matches = sorted(glob.glob(os.path.expanduser(url)))
                        if not matches:
                            raise ValueError(f"shard glob {url!r} matches no file")
                        out.extend(matches)
                    else:
                        out.append(os.path.expanduser(url) if not remote else url)
    if not out:
        raise ValueError(f"no shards in {spec!r}; give a path, brace pattern, glob, list or pipe: command")
    return out


# --------------------------------------------------------------------------------------------
# Tar streaming (our own loop: tarfile silently stops at a truncated header, we must notice)
# --------------------------------------------------------------------------------------------


class ShardError(Exception):
    """A shard is unreadable, truncated or corrupt from some point on. `member` names the
    member whose data was cut, when its header was still read (the samples before it are
    then known to be complete)."""

    def __init__(self, msg: str, member: str | None = None):
        super().__init__(msg)
        self.member = member


class _Prepended(io.RawIOBase):
    """A read-only stream that first returns `head`, then the rest of `f`."""

    def __init__(self, head: bytes, f: Any):
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _open_shard(url: str) -> tuple[Any, Any]:
    """(stream to read, object to close). Gzip-compressed tars are recognised by magic bytes."""
    if is_remote(url):
        from webdataset.gopen import gopen

        raw = gopen(url, "rb")
    else:
        raw = open(url, "rb")  # noqa: SIM115 - closed by the caller
    head = raw.read(2)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=io.BufferedReader(_Prepended(head, raw))), raw
    if hasattr(raw, "seek") and getattr(raw, "seekable", lambda: False)():
        raw.seek(0)
        return raw, raw
    return io.BufferedReader(_Prepended(head, raw)), raw


def _read_exact(f: Any, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = f.read(n - got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _skip(f: Any, n: int) -> None:
    if n <= 0:
        return
    if getattr(f, "seekable", lambda: False)():
        f.seek(n, os.SEEK_CUR)  # a seek past the end shows up as a missing next header
        return
    while n > 0:
        data = f.read(min(n, 1 << 20))
        if not data:
            raise ShardError("unexpected end of data inside a member")
        n -= len(data)


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        m = re.match(rb"(\d+) ([^=]+)=", data[pos:])
        if not m:
            break
        length = int(m.group(1))
        value = data[pos + m.end() : pos + length - 1]
        out[m.group(2).decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar(f: Any, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of each regular member of an (uncompressed) tar stream; data is None for
    members `want` rejects (they are skipped without reading). Raises ShardError when the
    archive is truncated (no end-of-archive block) or a header is corrupt."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        buf = _read_exact(f, _BLOCK)
        if not buf:
            raise ShardError("archive ends without its end-of-archive block (truncated)")
        if len(buf) < _BLOCK:
            raise ShardError("truncated header")
        if buf.count(0) == _BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise ShardError(f"corrupt header: {e}") from None
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE):
            # Extended headers describe the member that follows (its name, maybe its size).
            size = info.size
            padded = -(-size // _BLOCK) * _BLOCK
            data = _read_exact(f, padded)
            if len(data) < padded:
                raise ShardError("unexpected end of data inside an extended header")
            if info.type == tarfile.XHDTYPE:
                pax = _pax_records(data[:size])
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        size = int(pax["size"]) if "size" in pax else info.size
        padded = -(-size // _BLOCK) * _BLOCK
        name = pax.get("path") or long_name or info.name
        long_name, pax = None, {}
        if info.type not in _REGULAR:
            _skip(f, padded)
            continue
        if want is not None and not want(name):
            _skip(f, padded)
            yield name, None
            continue
        data = _read_exact(f, size)
        if len(data) < size:
            raise ShardError(f"unexpected end of data inside member {name} (truncated)", member=name)
        _skip(f, padded - size)
        yield name, data


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest
    (lowercased). "a/000001.jpg" -> ("a/000001", "jpg")."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def iter_raw_samples(
    url: str, on_error: Callable[[str, str], None], want: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes}) groups of consecutive members of one shard. A broken shard ends the
    iteration after calling on_error(url, reason); the group at the break is dropped unless a
    later sample's header proves it complete."""
    stream = closer = None
    key: str | None = None
    group: dict[str, bytes | None] = {}
    try:
        stream, closer = _open_shard(url)
        for name, data in iter_tar(stream, want):
            if os.path.basename(name).startswith("."):
                continue  # editor/OS droppings, not samples
            k, ext = split_key(name)
            if k != key:
                if key is not None and group:
                    yield key, group
                key, group = k, {}
            group[ext] = data
        if key is not None and group:
            yield key, group
    except GeneratorExit:
        raise
    except Exception as e:  # any failure to read the shard is a skipped shard, never a crash
        cut = getattr(e, "member", None)
        if cut is not None and key is not None and group and split_key(cut)[0] != key:
            yield key, group  # a later sample's header was read, so this one is complete
        on_error(url, f"{type(e).__name__}: {e}")
    finally:
        for obj in (stream, closer):
            try:
                if obj is not None:
                    obj.close()
            except Exception:
                pass


def caption_of(group: dict[str, bytes | None]) -> tuple[str | None, dict[str, Any] | None]:
    """(caption or None, meta or None): caption from .txt, else from the json "caption"."""
    meta = None
    if group.get("json") is not None:
        try:
            meta = json.loads(group["json"])
            if not isinstance(meta, dict):
                meta = {"value": meta}
        except (ValueError, UnicodeDecodeError):
            meta = None
    text = None
    if group.get("txt") is not None:
        text = group["txt"].decode("utf-8", errors="replace").strip()
    elif meta is not None and isinstance(meta.get("caption"), str):
        text = meta["caption"].strip()
    return text, meta


def iter_captions(urls: str | list[str]) -> Iterator[str]:
    """Every caption in the shards (no image decoding); broken shards are logged and skipped."""

    def warn(url: str, reason: str) -> None:
        log.warning("skipping unreadable shard %s (%s)", url, reason)

    for url in expand_urls(urls):
        for _, group in iter_raw_samples(url, warn, want=lambda n: split_key(n)[1] in ("txt", "json")):
            text, _ = caption_of(group)
            if text is not None:
                yield text


def train_tokenizer_from_shards(
    shard_pattern: str | list[str], vocab_size: int, out_path: str | os.PathLike
) -> BPETokenizer:
    """Train a BPE on every caption in the shards (see expand_urls) and save it to out_path."""
    urls = expand_urls(shard_pattern)
    return BPETokenizer.train(iter_captions(urls), vocab_size, save_path=out_path)


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def is_remote(url: str) -> bool:
    """A `pipe:` command or a URL with a scheme (read through a process, never listed or globbed)."""
    return url.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) is not None


_SHARD_NAME = re.compile(r"[^\s/'\"=]+\.(?:tar\.gz|tgz|tar)(?=$|[\s'\"?#])")


def sibling_url(url: str, name: str) -> str:
    """Where file `name` lives next to shard `url`, reached the same way: a local path's directory,
    a URL's last path segment, or the shard's file name inside a `pipe:` command
    ("pipe:aws s3 cp s3://b/cache-00000.tar -" -> "pipe:aws s3 cp s3://b/cache_meta.json -")."""
    if not is_remote(url):
        return str(Path(url).parent / name)
    if url.startswith("pipe:"):
        m = _SHARD_NAME.search(url)
        if m is None:
            raise ValueError(f"cannot tell where {name} is from the shard command {url!r}: it names no *.tar file; "
                             "give the shards as a pipe: command that names each shard's file")
        return url[: m.start()] + name + url[m.end():]
    head, _, _ = url.split("?")[0].split("#")[0].rpartition("/")
    return f"{head}/{name}"


def read_url_bytes(url: str, timeout_s: float = 600.0) -> bytes:
    """The whole content of a local file, a `pipe:` command's stdout, or a URL (webdataset's gopen).
    Raises FileNotFoundError naming the command and its stderr when it fails."""
    if url.startswith("pipe:"):
        import subprocess

        r = subprocess.run(url[5:], shell=True, capture_output=True, timeout=timeout_s)  # noqa: S602 - the user's pipe
        if r.returncode != 0:
            err = r.stderr.decode(errors="replace")[-500:].strip()
            raise FileNotFoundError(f"{url!r} exited {r.returncode}: {err}")
        return r.stdout
    if is_remote(url):
        from webdataset.gopen import gopen

        try:
            with gopen(url, "rb") as f:
                return f.read()
        except Exception as e:  # noqa: BLE001 - curl, a missing object, ...: one clear error
            raise FileNotFoundError(f"cannot read {url!r}: {type(e).__name__}: {e}") from e
    return Path(url).read_bytes()


def _remote_manifest_counts(urls: list[str]) -> dict[str, int] | None:
    """{shard file name: count} from the manifest.json next to the first remote shard (our shapes
    writer's format), fetched the way the shards are; None when there is none."""
    try:
        data = json.loads(read_url_bytes(sibling_url(urls[0], "manifest.json"), timeout_s=120.0))
        return {e["name"]: int(e["count"]) for entries in data.get("shards", {}).values() for e in entries}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _shard_name(url: str) -> str | None:
    if url.startswith("pipe:"):
        m = _SHARD_NAME.search(url)
        return m.group(0) if m else None
    return url.split("?")[0].rstrip("/").rpartition("/")[2]


def _manifest_count(url: str) -> int | None:
    """Count from a neighbouring manifest.json (our shapes writer) or {stem}_stats.json
    (img2dataset's "successes"), when either exists."""
    if is_remote(url):
        return None
    p = Path(url)
    manifest = p.parent / "manifest.json"
    if manifest.is_file():
        try:
            for entries in json.loads(manifest.read_text()).get("shards", {}).values():
                for e in entries:
                    if e.get("name") == p.name:
                        return int(e["count"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    stats = p.with_name(p.name.split(".")[0] + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            pass
    return None


def count_samples(urls: str | list[str]) -> int:
    """Number of samples (keys with an image member) in the shards. Uses manifest.json or
    img2dataset's *_stats.json when present, else scans tar headers without reading images.

    Remote shards (URLs, `pipe:` commands) are never streamed to count them (every rank would read
    the whole data set before its first step): their count comes from a manifest.json next to them,
    fetched the same way, else this raises ValueError asking for data.epoch_size."""
    urls = expand_urls(urls)
    remote = [u for u in urls if is_remote(u)]
    if remote:
        counts = _remote_manifest_counts(remote)
        names = [_shard_name(u) for u in remote]
        if counts is None or any(n not in counts for n in names):
            raise ValueError(f"{len(remote)} of the shards are remote (e.g. {remote[0]!r}) and have no manifest.json "
                             "listing them next to them; set data.epoch_size to the number of training samples "
                             "(e.g. the sum of \"successes\" in img2dataset's *_stats.json): counting would stream "
                             "every shard on every rank")
    total = 0
    for url in urls:
        if is_remote(url):
            total += counts[_shard_name(url)]
            continue
        n = _manifest_count(url)
        if n is None:
            keys: set[str] = set()

            def warn(u: str, reason: str) -> None:
                log.warning("count_samples: shard %s is unreadable or truncated (%s)", u, reason)

            for key, group in iter_raw_samples(url, warn, want=lambda _n: False):
                if any(ext in group for ext in IMAGE_EXTS):
                    keys.add(key)
            n = len(keys)
        total += n
    return total


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0])


def iter_assigned_samples(urls: list[str], filters: list[tuple[int, int]], on_error) -> Iterator[tuple[str, str, Any]]:
    """(url, key, group) of the samples this reader owns: `filters` are (modulus, remainder) levels
    (rank, then worker) applied when there are fewer shards than readers."""
    counts = [0] * len(filters)
    for url in urls:
        for key, group in iter_raw_samples(url, on_error):
            keep = True
            for j, (mod, rem) in enumerate(filters):
                # Each level counts only the samples that passed the levels above it.
                mine = counts[j] % mod == rem
                counts[j] += 1
                if not mine:
                    keep = False
                    break
            if keep:
                yield url, key, group


def shuffle_buffered(it: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle with a buffer of `size` items (size <= 1: pass through)."""
    if size <= 1:
        yield from it
        return
    buf: list[Any] = []
    for item in it:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(len(buf))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


# --------------------------------------------------------------------------------------------
# Positions: resume a reader where it was, without replaying its stream
# --------------------------------------------------------------------------------------------


def _rng_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(rng: random.Random, state: list[Any]) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def _indexed_want(skip: int, wanted: set[int] | None = None) -> Callable[[str], bool]:
    """A `want` for iter_raw_samples that reads only the members of samples (raw group index within
    the shard) >= skip, or of the indices in `wanted`; skipped members are seeked over (local files)."""
    cur = {"key": None, "idx": -1}

    def want(name: str) -> bool:
        if os.path.basename(name).startswith("."):
            return False  # iter_raw_samples drops these without starting a group
        k = split_key(name)[0]
        if k != cur["key"]:
            cur["key"], cur["idx"] = k, cur["idx"] + 1
        return cur["idx"] >= skip if wanted is None else cur["idx"] in wanted

    return want


class PositionedSamples:
    """(url, key, group) of one reader (a rank's DataLoader worker): its shards in order, the sample
    filters of `plan`, and the sliding shuffle buffer of `shuffle_buffered` (the same stream, draw for
    draw), with a small JSON position between any two items: shard index and raw sample offset in it,
    the filter counters, the raw positions of the buffered samples, and the generator's state.

    Built from a position, it re-reads only the buffered samples and the current shard from its
    offset (members before it are seeked over in local files; a `pipe:` shard streams its prefix),
    never the stream before it (docs/training.md, "Running at scale")."""

    def __init__(self, urls: list[str], filters: list[tuple[int, int]], on_error: Callable[[str, str], None],
                 buffer_size: int, rng: random.Random, start: dict[str, Any] | None = None):
        self.urls, self.filters, self.on_error, self.size, self.rng = list(urls), filters, on_error, buffer_size, rng
        self._shard, self._offset, self._counts = 0, 0, [0] * len(filters)
        self._buf: list[tuple[tuple[int, int], str, str, dict[str, bytes | None]]] = []
        self._drain = False
        if start is not None:
            self._restore(start)

    def state(self) -> dict[str, Any]:
        return {"shard": self._shard, "offset": self._offset, "counts": list(self._counts),
                "buffer": [list(item[0]) for item in self._buf], "drain": self._drain,
                "rng": _rng_to_json(self.rng), "num_shards": len(self.urls)}

    def _restore(self, st: dict[str, Any]) -> None:
        if st.get("num_shards") != len(self.urls) or len(st["counts"]) != len(self.filters):
            raise ValueError(f"a reader position for {st.get('num_shards')} shards and {len(st['counts'])} filters "
                             f"does not fit this reader ({len(self.urls)} shards, {len(self.filters)} filters)")
        self._shard, self._offset, self._counts = int(st["shard"]), int(st["offset"]), [int(c) for c in st["counts"]]
        self._drain = bool(st["drain"])
        _rng_from_json(self.rng, st["rng"])
        tags = [(int(j), int(r)) for j, r in st["buffer"]]
        found: dict[tuple[int, int], tuple[str, str, dict[str, bytes | None]]] = {}
        for j in sorted({j for j, _ in tags}):
            wanted = {r for jj, r in tags if jj == j}
            url = self.urls[j]
            for r, (key, group) in enumerate(iter_raw_samples(url, lambda *_: None, _indexed_want(0, wanted))):
                if r in wanted:
                    found[(j, r)] = (url, key, group)
                    if len(found) == len(tags) or all((j, x) in found for x in wanted):
                        break
        missing = [t for t in tags if t not in found]
        if missing:
            raise ValueError(f"resuming a reader: {len(missing)} buffered samples are no longer in their shards "
                             f"(e.g. sample #{missing[0][1]} of {self.urls[missing[0][0]]}); did the shards change?")
        self._buf = [(t, *found[t]) for t in tags]

    def _raw(self) -> Iterator[tuple[tuple[int, int], str, str, dict[str, bytes | None]]]:
        while self._shard < len(self.urls):
            j, skip = self._shard, self._offset
            url = self.urls[j]
            want = _indexed_want(skip) if skip else None
            for r, (key, group) in enumerate(iter_raw_samples(url, self.on_error, want)):
                if r < skip:
                    continue
                self._offset = r + 1
                keep = True
                for lvl, (mod, rem) in enumerate(self.filters):
                    # Each level counts only the samples that passed the levels above it.
                    mine = self._counts[lvl] % mod == rem
                    self._counts[lvl] += 1
                    if not mine:
                        keep = False
                        break
                if keep:
                    yield (j, r), url, key, group
            self._shard, self._offset = j + 1, 0

    def __iter__(self) -> Iterator[tuple[str, str, dict[str, bytes | None]]]:
        if not self._drain:
            for item in self._raw():
                if self.size <= 1:
                    yield item[1:]
                    continue
                if len(self._buf) < self.size:
                    self._buf.append(item)
                    continue
                k = self.rng.randrange(len(self._buf))
                self._buf[k], item = item, self._buf[k]
                yield item[1:]
            if self.size > 1:
                self.rng.shuffle(self._buf)
            self._drain = True
        while self._buf:
            yield self._buf.pop(0)[1:]


class ImageTextShards(IterableDataset):
    """Image-text samples from webdataset shards, as dicts:
    {"image": FloatTensor (3, img_size, img_size) in [-1, 1], "caption": str, "key": str,
     "ids": LongTensor (context,) when a tokenizer is given, "meta": dict when with_meta}.

    Splitting: shards are divided over ranks, then over DataLoader workers. When there are
    fewer shards than readers at a level, every reader of that level reads all shards and
    keeps samples whose index (in the shard order of this epoch) is its own modulo the number
    of readers, so no sample is read twice and none is lost. With resampled=True each reader
    instead draws shards with replacement forever (webdataset's "resampled" semantics).

    Shuffling (shuffle_buffer > 1): the shard order is permuted by (seed, epoch), the same on
    every rank, and samples pass through a buffer seeded by (seed, epoch, rank, worker). With
    shuffle_buffer <= 1 the order is the order in the shards. Call set_epoch() every epoch.

    Errors never raise: an undecodable image, a sample with no image or no caption is a
    skipped sample; a shard that cannot be opened or ends early (truncated, corrupt header) is
    a skipped shard (its samples before the break are kept). Each is logged once per shard.
    `self.stats` = {"samples", "skipped_samples", "skipped_shards"} summed over this dataset's
    readers on this rank, since construction (or reset_stats()). DataLoader workers hold copies
    of the dataset, so the counters live in a shared-memory tensor with one row per worker that
    the workers increment and the main process reads; read it after (or during) iteration. A
    shard read by several readers (modulo mode) is counted once by each. Ranks count apart.
    """

    def __init__(
        self,
        urls: str | list[str],
        img_size: int = 256,
        hflip: bool = False,
        tokenizer: BPETokenizer | None = None,
        context: int = 77,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        with_meta: bool = False,
    ):
        super().__init__()
        self.urls = expand_urls(urls)
        if rank is None or world_size is None:
            r, w = _dist_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        self.img_size, self.hflip = img_size, hflip
        self.tokenizer, self.context = tokenizer, context
        self.shuffle_buffer, self.seed, self.resampled = shuffle_buffer, seed, resampled
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.with_meta = with_meta
        # One row per DataLoader worker, one writer per row: no locking needed.
        self._counts = torch.zeros(MAX_WORKERS, len(STAT_NAMES), dtype=torch.long).share_memory_()
        self.pos_every = 0  # > 0: every pos_every-th sample of a reader carries its position ("_pos")
        self.worker_shift = 0  # DataLoader worker i reads as reader (i + shift) % num_workers
        self.resume_positions: dict[int, dict[str, Any]] = {}  # reader -> position to start from

    def set_resume(self, positions: dict[int, dict[str, Any]] | None, worker_shift: int = 0) -> None:
        """Readers start at these positions (this epoch); DataLoader worker 0 plays reader `worker_shift`,
        so the loader's round-robin continues with the reader after the last one consumed."""
        self.resume_positions, self.worker_shift = dict(positions or {}), worker_shift

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def stats(self) -> dict[str, int]:
        return dict(zip(STAT_NAMES, (int(v) for v in self._counts.sum(0).tolist())))

    def reset_stats(self) -> None:
        self._counts.zero_()

    def _bump(self, worker: int, name: str) -> None:
        if worker < MAX_WORKERS:
            self._counts[worker, STAT_NAMES.index(name)] += 1

    # ---- splitting ---------------------------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        """(reader, readers): the DataLoader worker, rotated by worker_shift."""
        info = get_worker_info()
        wid, n = (0, 1) if info is None else (info.id, info.num_workers)
        return (wid + self.worker_shift) % n, n

    def plan(self, worker: int = 0, num_workers: int = 1) -> tuple[list[str], list[tuple[int, int]]]:
        """(shards this reader opens, [(modulus, remainder), ...] sample filters applied in turn)."""
        urls = list(self.urls)
        if self.shuffle_buffer > 1:
            order = np.random.default_rng(seed_int(self.seed, self.epoch)).permutation(len(urls))
            urls = [urls[i] for i in order]
        filters: list[tuple[int, int]] = []
        for part, parts in ((self.rank, self.world_size), (worker, num_workers)):
            if parts == 1:
                continue
            if len(urls) >= parts:
                urls = urls[part::parts]
            else:
                filters.append((parts, part))
        return urls, filters

    # ---- iteration ---------------------------------------------------------------------------

    def _raw(self, worker: int, num_workers: int) -> Iterator[tuple[str, str, dict[str, bytes | None]]]:
        def on_error(url: str, reason: str) -> None:
            self._bump(worker, "skipped_shards")
            log.warning("skipping the rest of shard %s: %s", url, reason)

        if self.resampled:
            rng = np.random.default_rng(seed_int(self.seed, self.epoch, self.rank, worker, 1))
            empty_draws = 0
            while True:
                url = self.urls[int(rng.integers(len(self.urls)))]
                got = 0
                for key, group in iter_raw_samples(url, on_error):
                    got += 1
                    yield url, key, group
                empty_draws = 0 if got else empty_draws + 1
                if empty_draws > 2 * len(self.urls) + 8:
                    # Without this guard an all-broken shard list would spin forever.
                    log.error("resampled reader stops: %d shard draws in a row gave no sample", empty_draws)
                    return
        urls, filters = self.plan(worker, num_workers)
        yield from iter_assigned_samples(urls, filters, on_error)

    def _decode(self, key: str, group: dict[str, bytes | None], rng: random.Random) -> dict[str, Any] | str:
        """The sample dict, or a string saying why the sample is skipped."""
        ext = next((e for e in IMAGE_EXTS if group.get(e) is not None), None)
        if ext is None:
            return f"no image member (have {sorted(group)})"
        text, meta = caption_of(group)
        if text is None:
            return "no caption (.txt or json 'caption')"
        try:
            with Image.open(io.BytesIO(group[ext])) as im:
                im.load()
                img = im.convert("RGB")
            image = preprocess(img, self.img_size, self.hflip, rng)
        except Exception as e:  # PIL raises many types for bad bytes
            return f"undecodable {ext}: {type(e).__name__}: {e}"
        out: dict[str, Any] = {"image": image, "caption": text, "key": os.path.basename(key)}
        if self.tokenizer is not None:
            out["ids"] = self.tokenizer.encode([text], self.context)[0]
        if self.with_meta:
            out["meta"] = meta if meta is not None else {}
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._worker()
        if worker >= MAX_WORKERS:
            log.warning("worker %d >= %d: its samples and skips are not counted in .stats", worker, MAX_WORKERS)
        warned: set[str] = set()
        rng = random.Random(seed_int(self.seed, self.epoch, self.rank, worker))

        def on_error(url: str, reason: str) -> None:
            self._bump(worker, "skipped_shards")
            log.warning("skipping the rest of shard %s: %s", url, reason)

        if self.resampled:
            stream: Any = shuffle_buffered(self._raw(worker, num_workers), self.shuffle_buffer, rng)
        else:
            urls, filters = self.plan(worker, num_workers)
            stream = PositionedSamples(urls, filters, on_error, self.shuffle_buffer, rng,
                                       self.resume_positions.get(worker))
        n = 0
        for url, key, group in stream:
            sample = self._decode(key, group, rng)
            if isinstance(sample, str):
                self._bump(worker, "skipped_samples")
                if url not in warned:
                    warned.add(url)
                    log.warning("skipping sample %s of %s: %s (further skips in this shard are only "
                                "counted)", key, url, sample)  # fmt: skip
                continue
            self._bump(worker, "samples")
            n += 1
            if self.pos_every and not self.resampled and n % self.pos_every == 0:
                sample["_pos"] = {"reader": worker, "readers": num_workers, "epoch": self.epoch, "at": stream.state()}
            yield sample


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def _worker_stop_signal(signum: int, _frame: Any) -> None:
    """A worker's first SIGTERM is ignored; a second one (torch terminating a worker that did not
    stop when its loader shut down) ends it. SIGUSR1 is always ignored."""
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_STOP = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals_in_worker(_worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: a scheduler (SLURM time limit, `scancel`, `--signal=USR1@T`) signals
    every process of the job, workers included; the main process must reach its checkpoint with its
    workers alive, then shuts them down itself. Start workers inside `stop_signals_blocked()` so a
    signal that arrives between the fork and this function waits for it instead of killing the worker.
    The owner must shut its loader iterators down before interpreter exit (multiprocessing's exit
    hook terminates daemonic workers with one SIGTERM, then joins them): LoaderStream does."""
    for sig in _STOP:
        signal.signal(sig, _worker_stop_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP)


class stop_signals_blocked:  # noqa: N801 - used as a context manager
    """Block SIGTERM/SIGUSR1 in this thread while DataLoader workers are forked (they inherit the mask
    and unblock it in ignore_stop_signals_in_worker); a signal for the main process meanwhile is
    delivered when the block ends, not lost."""

    def __enter__(self) -> stop_signals_blocked:
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors ("image" -> (B, 3, H, W), "ids" -> (B, T)); list strings and meta."""
    if not samples:
        raise ValueError("collate got an empty batch")
    out: dict[str, Any] = {}
    for name in samples[0]:
        vals = [s[name] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[name] = torch.stack(vals)
        else:
            out[name] = vals
    return out


def make_loader(dataset: ImageTextShards, batch_size: int, num_workers: int = 0, drop_last: bool = True) -> DataLoader:
    """DataLoader over the dataset with `collate`; workers are re-created each epoch so that
    set_epoch() reaches them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
