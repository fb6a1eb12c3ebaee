"""Tests of the BPE tokenizer: training, fixed-context encoding with eot kept, decoding, loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from dream_fast.data import shapes as S
from dream_fast.data.bpe import BPETokenizer
from dream_fast.data.shards import train_tokenizer_from_shards


def _captions(n: int = 400) -> list[str]:
    return [
        S.caption(S.sample_attributes(S.sample_rng(0, "train", i), "train", max_shapes=2)) for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(_captions(), vocab_size=600)


def test_special_ids_and_vocab(tok: BPETokenizer) -> None:
    ids = {tok.sot_id, tok.eot_id, tok.pad_id}
    assert len(ids) == 3 and max(ids) < tok.vocab_size
    assert 259 < tok.vocab_size <= 600  # bytes + specials + merges learned from the captions


def test_round_trip_and_lowercase(tok: BPETokenizer) -> None:
    caps = _captions(50)
    ids = tok.encode(caps, context=64)
    assert ids.shape == (50, 64) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.sot_id).all()
    assert tok.decode(ids) == caps
    assert tok.decode(ids[3]) == caps[3]
    assert tok.decode(tok.encode(["A Small RED Circle"], 16)[0]) == "a small red circle"
    # Merges were learned: a frequent word is one token, so captions are much shorter than bytes.
    n_tokens = (ids != tok.pad_id).sum(1) - 2
    assert (n_tokens < torch.tensor([len(c) for c in caps]) / 3).all()


def test_eot_position_is_pooling_index(tok: BPETokenizer) -> None:
    caps = ["a red circle", "a large white triangle in the top right on a navy background"]
    ids = tok.encode(caps, context=32)
    first_eot = (ids == tok.eot_id).int().argmax(1)
    lengths = torch.tensor([len(tok.tokenizer.encode(c, add_special_tokens=False).ids) for c in caps])
    assert torch.equal(first_eot, lengths + 1)
    for b in range(2):
        assert (ids[b, first_eot[b] + 1 :] == tok.pad_id).all()


def test_truncation_keeps_eot_and_is_reported(tok: BPETokenizer) -> None:
    long = " and ".join(_captions(6))
    ids, cut = tok.encode([long, "a red circle"], context=8, return_truncated=True)
    assert cut.tolist() == [True, False]
    assert ids[0, -1] == tok.eot_id and ids[0, 0] == tok.sot_id
    assert (ids[0, 1:-1] != tok.eot_id).all() and (ids[0] != tok.pad_id).all()
    assert tok.decode(ids[0]) == tok.decode(tok.encode([long], 64)[0])[: len(tok.decode(ids[0]))]
    # A caption that exactly fills the context is not cut.
    n = len(tok.tokenizer.encode("a red circle", add_special_tokens=False).ids)
    ids2, cut2 = tok.encode(["a red circle"], context=n + 2, return_truncated=True)
    assert not cut2[0] and ids2[0, -1] == tok.eot_id


def test_empty_caption(tok: BPETokenizer) -> None:
    ids = tok.encode([""], context=6)
    assert ids[0].tolist() == [tok.sot_id, tok.eot_id] + [tok.pad_id] * 4
    assert tok.decode(ids[0]) == ""


def test_save_and_from_file(tok: BPETokenizer, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    loaded = BPETokenizer.from_file(path)
    caps = _captions(20)
    assert torch.equal(loaded.encode(caps, 40), tok.encode(caps, 40))
    assert (loaded.sot_id, loaded.eot_id, loaded.pad_id) == (tok.sot_id, tok.eot_id, tok.pad_id)
    assert BPETokenizer.from_file(path.parent).vocab_size == tok.vocab_size  # a directory works too
    # Pickles (DataLoader workers get copies).
    assert torch.equal(pickle.loads(pickle.dumps(loaded)).encode(caps, 40), tok.encode(caps, 40))


def test_from_file_without_pad_uses_eot_and_custom_names(tmp_path: Path) -> None:
    # A CLIP-like file: start/end tokens but no pad token.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        _captions(100),
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<|startoftext|>", "<|endoftext|>", "[BOS]"],
                            show_progress=False),
    )  # fmt: skip
    path = tmp_path / "clip_like.json"
    raw.save(str(path))
    t = BPETokenizer.from_file(path)
    assert t.pad_id == t.eot_id == raw.token_to_id("<|endoftext|>")
    row = t.encode(["a red circle"], 12)[0]
    assert (row == t.eot_id).int().argmax() == len(raw.encode("a red circle").ids) + 1
    assert BPETokenizer.from_file(path, sot_token="[BOS]").sot_id == raw.token_to_id("[BOS]")
    with pytest.raises(ValueError, match="sot_token"):
        BPETokenizer.from_file(path, sot_token="<s>")


def test_bad_input(tok: BPETokenizer) -> None:
    with pytest.raises(ValueError, match="context"):
        tok.encode(["a"], context=1)
    with pytest.raises(TypeError, match="list of str"):
        tok.encode([1, 2], context=8)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["a"], vocab_size=10)
    with pytest.raises(FileNotFoundError):
        BPETokenizer.from_file("/nonexistent/tokenizer.json")


def test_train_from_shards(tmp_path: Path) -> None:
    S.write_shapes_shards(tmp_path, 48, 0, 0, samples_per_shard=16, progress=False)
    out = tmp_path / "tok.json"
    t = train_tokenizer_from_shards(str(tmp_path / "train-{00000..00002}.tar"), 500, out)
    assert out.is_file()
    _, text, _ = S.make_sample(0, "train", 5)
    assert t.decode(BPETokenizer.from_file(out).encode([text], 40)[0]) == text
