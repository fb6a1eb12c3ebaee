"""Training data paths: corrupt shard members are skipped and reported; training from `dream-fast
cache` shards equals online training (tiny random VAE and T5 saved to disk) within fp16 tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_helpers import mini_config, write_config

from dream_fast.config import load_config
from dream_fast.data.shapes import shard_pattern, write_shapes_shards


def _losses(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_corrupt_members_are_skipped_and_counted(tmp_path: Path) -> None:
    from dream_fast.train import train

    shapes = tmp_path / "wds"
    write_shapes_shards(shapes, 96, 0, 0, img_size=16, samples_per_shard=32, progress=False)
    urls = shard_pattern(shapes, "train")
    data = bytearray(Path(urls[0]).read_bytes())
    for start in (data.find(b"\x89PNG"), data.find(b"\x89PNG", data.find(b"\x89PNG") + 8)):
        data[start + 16 : start + 60] = b"\xff" * 44  # two undecodable images, tar headers intact
    Path(urls[0]).write_bytes(bytes(data))
    whole = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(whole[: len(whole) // 2])  # truncated mid-member
    cfg = load_config(write_config(tmp_path / "c.yaml", mini_config(
        tmp_path, data={"source": "webdataset", "shards": str(shapes / "train-*.tar"), "shuffle_buffer": 0,
                        "num_workers": 0}, train={"max_steps": 14, "ckpt_every": 100})))  # fmt: skip
    res = train(cfg, progress=False)
    assert res.steps == 14 and res.epochs > 1.0  # went through every shard, then on to a second epoch
    assert res.skipped_samples >= 2 and res.skipped_shards >= 1
    last = json.loads((res.out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_samples"] == res.skipped_samples


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=16).save_pretrained(path)  # fmt: skip


def _tiny_t5(path: Path, captions: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=max(64, tok.get_vocab_size()),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(cfg).save_pretrained(path)


@pytest.mark.slow
def test_cache_round_trip_matches_online_training(tmp_path: Path) -> None:
    from dream_fast.data.shards import iter_captions
    from dream_fast.train import train
    from dream_fast.train.cache import build_cache, finalize_meta

    shapes = tmp_path / "wds"
    write_shapes_shards(shapes, 48, 0, 0, img_size=16, progress=False)
    shards = shard_pattern(shapes, "train")[0]
    _tiny_vae(tmp_path / "vae")
    _tiny_t5(tmp_path / "t5", list(iter_captions(shards)))
    model = dict(
        tokenizer="vae",
        vae_path=str(tmp_path / "vae"),
        vae_stride=2,
        patch_size=2,
        text_cond="t5",
        t5_path=str(tmp_path / "t5"),
        t5_dim=16,
        t5_len=8,
    )
    data = dict(source="webdataset", shards=shards, shuffle_buffer=0, num_workers=0, hflip=False)
    train_sec = dict(max_steps=3, ckpt_every=100, out_dir=str(tmp_path / "online"))
    mask = dict(schedule="fixed", fixed_ratio=0.75)  # both losses every step: latents and T5 both matter
    online_cfg = load_config(
        write_config(tmp_path / "o.yaml", mini_config(tmp_path, model=model, data=data, mask=mask, train=train_sec))
    )
    online = train(online_cfg, progress=False)

    res = build_cache(online_cfg, shards, tmp_path / "cache", batch_size=16)
    assert res["written"] == 1 and res["samples"] == 48
    assert finalize_meta(tmp_path / "cache")["num_samples"] == 48
    again = build_cache(online_cfg, shards, tmp_path / "cache", batch_size=16)
    assert again["written"] == 0 and again["skipped"] == 1  # resumable: finished shards are kept

    cached_model = dict(model, vae_path=None, t5_path=None)  # training from the cache needs neither
    cached_cfg = load_config(write_config(tmp_path / "k.yaml", mini_config(
        tmp_path, model=cached_model, mask=mask, data=dict(data, source="cache", shards=str(tmp_path / "cache")),
        train=dict(train_sec, out_dir=str(tmp_path / "cached")))))  # fmt: skip
    cached = train(cached_cfg, progress=False)
    a, b = _losses(online.out_dir), _losses(cached.out_dir)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):  # fp16 moments and T5 embeddings in the cache
        assert abs(x - y) <= 2e-3 * max(1.0, abs(x)), (a, b)
    assert min(_losses(online.out_dir, "loss_diff")) > 0.1  # the diffusion loss on VAE latents took part


def test_shape_groups_put_same_scene_different_shape_side_by_side() -> None:
    """data.shapes_group_size: batches hold runs of one scene drawn with different shapes; every
    sample is used once per epoch; two ranks split whole batches between them."""
    import numpy as np

    from dream_fast.data.shapes import SPEC, caption, sample_attributes, sample_rng, scene_key
    from dream_fast.data.streams import InMemoryStream, group_runs, grouped_order

    caps = [caption(sample_attributes(sample_rng(0, "train", i), "train")) for i in range(6000)]
    keys = [scene_key(c) for c in caps]
    assert scene_key("a small red circle at the top on a gray background") == \
        scene_key("a small red triangle at the top on a gray background") != \
        scene_key("a large red triangle at the top on a gray background")
    runs = group_runs(keys, caps, 3, torch.Generator().manual_seed(0))
    assert sorted(i for r in runs for i in r) == list(range(len(caps)))
    for r in runs:
        assert 1 <= len(r) <= 3 and len({keys[j] for j in r}) == 1
        assert len({next(s for s in SPEC.shapes if s in caps[j]) for j in r}) == len(r)  # distinct shapes
    sizes = np.array([len(r) for r in runs])
    # a plain shuffle would put a same-scene, other-shape pair side by side almost never
    assert (sizes * (sizes >= 2)).sum() > 0.75 * len(caps), np.bincount(sizes)
    order = grouped_order(keys, caps, 3, torch.Generator().manual_seed(0))
    assert order.tolist() == [i for r in runs for i in r]

    images = np.zeros((len(caps), 3, 4, 4), dtype=np.uint8)
    ids = torch.arange(len(caps))[:, None]
    streams = [InMemoryStream(images, ids, caps, 60, 0, r, 2, group_keys=keys, group_size=3) for r in (0, 1)]
    seen = [int(i) for s in streams for _ in range(s.batches_per_epoch) for i in next(s)["ids"][:, 0]]
    assert len(seen) == len(set(seen)) == 2 * streams[0].batches_per_epoch * 60
    with pytest.raises(ValueError, match="group keys"):
        InMemoryStream(images, ids, caps, 60, 0, 0, 1, group_keys=keys[:5], group_size=3)
