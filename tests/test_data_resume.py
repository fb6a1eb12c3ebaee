"""Resume without replay (docs/training.md, "Running at scale"): a streamed run resumed mid-epoch
starts each DataLoader worker at its saved shard, offset, shuffle buffer and generator, and gives
the uninterrupted sample stream, sample for sample (ids and augmented pixels), across an epoch end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dream_fast.data.shapes import write_shapes_shards
from dream_fast.data.shards import ImageTextShards
from dream_fast.data.streams import LoaderStream

B = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("resume_shards")
    # 5 uneven shards (16, 16, 16, 16, 8): the two workers run out at different batches
    write_shapes_shards(d, 72, 8, 8, seed=2, img_size=16, samples_per_shard=16, progress=False)
    return str(d / "train-{00000..00004}.tar")


def _stream(shards: str, workers: int, one_shard: bool) -> LoaderStream:
    urls = shards.replace("{00000..00004}", "00000") if one_shard else shards
    ds = ImageTextShards(urls, img_size=16, hflip=True, shuffle_buffer=6, seed=7, rank=0, world_size=1)
    return LoaderStream(ds, batch_size=B, num_workers=workers, epoch_size=72)


def _take(stream: LoaderStream, n: int) -> list[tuple[list[str], torch.Tensor]]:
    return [(b["key"], b["image"]) for b in (next(stream) for _ in range(n))]


@pytest.mark.parametrize(("one_shard", "n", "cuts"), [
    # shards split over the 2 workers: the epoch is 18 batches, the 2nd worker's last one is batch 16, so a cut
    # at 17 resumes past a worker that ran dry; 20 is in the second epoch
    (False, 22, (17, 20)),
    (True, 7, (3,)),  # one shard: each worker keeps every 2nd sample (filter counters); 4 batches an epoch
])  # fmt: skip
def test_resumed_stream_is_the_uninterrupted_one(shards: str, one_shard: bool, n: int, cuts) -> None:
    workers = 2
    ref = _stream(shards, workers, one_shard)
    straight = _take(ref, n)
    assert ref.epoch == 1  # the streams below cross an epoch end
    for cut in cuts:
        first = _stream(shards, workers, one_shard)
        head = _take(first, cut)
        state = json.loads(json.dumps(first.state()))  # as the checkpoint's data_rank{r}.json holds it
        assert "positions" in state and len(state["positions"]) == workers
        resumed = _stream(shards, workers, one_shard)
        resumed.load_state(state)
        tail = _take(resumed, n - cut)
        assert resumed.replayed == 0
        got = head + tail
        assert [k for k, _ in got] == [k for k, _ in straight], f"cut at batch {cut}"
        for (_, a), (_, b) in zip(got, straight):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # same flips: the generator resumed too


def test_resume_reads_from_the_position_not_from_the_epoch_start(shards: str) -> None:
    cut = 12
    first = _stream(shards, 2, False)
    _take(first, cut)
    state = first.state()
    resumed = _stream(shards, 2, False)
    resumed.load_state(state)
    _take(resumed, 1)
    # decoded samples: the first batch, what the workers prefetched (2 batches each) and the shuffle
    # buffers they refilled; a replay would have decoded the 48 samples before the cut first
    assert resumed.replayed == 0
    assert resumed.stats["samples"] <= 5 * B < cut * B


def test_other_worker_count_falls_back_to_replay(shards: str) -> None:
    first = _stream(shards, 2, False)
    _take(first, 5)
    resumed = _stream(shards, 1, False)
    resumed.load_state(first.state())
    straight = _take(_stream(shards, 1, False), 7)
    assert [k for k, _ in _take(resumed, 2)] == [k for k, _ in straight[5:]]
    assert resumed.replayed == 5


def test_position_of_changed_shards_is_refused(shards: str, tmp_path: Path) -> None:
    first = _stream(shards, 0, False)
    _take(first, 3)
    state = first.state()
    state["positions"]["0"]["buffer"][0][1] = 999  # a buffered sample the shard does not have
    resumed = _stream(shards, 0, False)
    resumed.load_state(state)
    with pytest.raises(ValueError, match="did the shards change"):
        next(resumed)
