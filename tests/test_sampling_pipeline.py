"""DreamPipeline and `dream-fast sample`: bundle loading, SAD results, batch-size independence,
inpainting through images, outputs on disk, and every bad input named in a clear error."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sampling_helpers import tiny_model

from dream_fast.cli import main as cli_main
from dream_fast.data.bpe import BPETokenizer
from dream_fast.pretrained import save_pretrained
from dream_fast.sampling.inpaint import outpaint_mask
from dream_fast.sampling.pipeline import DreamPipeline

CAPTIONS = [
    f"a {size} {colour} {shape} at the {pos}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue")
    for shape in ("circle", "square", "triangle")
    for pos in ("left", "right", "top", "bottom")
]
PROMPTS = ["a small red circle at the left", "a large blue square at the top", "a green triangle"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg, model = tiny_model()
    tok = BPETokenizer.train(CAPTIONS, vocab_size=300)
    empty = tok.encode([""], cfg.model.text_context)[0]
    model.set_text_specials(tok.eot_id, empty)
    cfg.sample.num_iter, cfg.sample.sad_threshold, cfg.sample.num_candidates = 4, 2, 2
    return save_pretrained(model.state_dict(), cfg, tok, tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture(scope="module")
def pipe(bundle):
    return DreamPipeline.from_pretrained(bundle, device="cpu")


def test_sad_generation_and_batch_independence(pipe):
    res = pipe(
        PROMPTS,
        num_candidates=3,
        threshold=2,
        steps=4,
        seed=5,
        batch_size=2,
        progress=False,
        return_tokens=True,
    )
    assert len(res.images) == 3 and all(im.size == (32, 32) for im in res.images)
    assert [len(s) for s in res.scores] == [3, 3, 3]
    assert all(c == int(np.argmax(s)) for c, s in zip(res.chosen, res.scores))
    assert res.seeds == [5, 6, 7]
    assert {"text_s", "sample_s", "decode_s", "total_s", "per_image_s"} <= set(res.timings)
    # the same prompt with the same seed, alone and with another batch size, gives the same image
    alone = pipe(PROMPTS[1], num_candidates=3, threshold=2, steps=4, seed=6, progress=False, return_tokens=True)
    torch.testing.assert_close(alone.tokens[0], res.tokens[1], atol=1e-4, rtol=1e-4)
    assert alone.chosen == res.chosen[1:2]
    other = pipe(
        PROMPTS,
        num_candidates=3,
        threshold=2,
        steps=4,
        seed=5,
        batch_size=3,
        progress=False,
        return_tokens=True,
    )
    torch.testing.assert_close(other.tokens, res.tokens, atol=1e-4, rtol=1e-4)
    # a different seed gives different images
    again = pipe(PROMPTS, num_candidates=3, threshold=2, steps=4, seed=50, progress=False, return_tokens=True)
    assert not torch.allclose(again.tokens, res.tokens)


def test_defaults_come_from_config(pipe):
    res = pipe(PROMPTS[:1], progress=False)
    assert res.settings["num_candidates"] == 2 and res.settings["threshold"] == 2 and res.settings["steps"] == 4
    plain = pipe(PROMPTS[:1], num_candidates=1, progress=False)
    assert plain.scores is None and plain.chosen is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[]), "prompt list is empty"),
        (dict(num_candidates=0), "num_candidates must be >= 1"),
        (dict(threshold=4, steps=4), r"threshold must be in \[1, steps-1=3\]"),
        (dict(threshold=0, steps=4), "threshold must be in"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(steps=1, num_candidates=2), "needs steps >= 2"),
        (dict(cfg=0.5), "cfg must be >= 1.0"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(image=Image.new("RGB", (32, 32))), "needs both image= and mask="),
    ],
)
def test_bad_settings(pipe, kwargs, match):
    kwargs = {"prompts": PROMPTS[:1], "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_long_prompts_warn_once(pipe):
    long = " ".join(["red circle"] * 40)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pipe([long, long, "a red circle"], num_candidates=1, steps=2, progress=False)
    msgs = [str(x.message) for x in w if issubclass(x.category, UserWarning) and "truncated" in str(x.message)]
    assert len(msgs) == 1 and "2 prompt(s)" in msgs[0] and "[0, 1]" in msgs[0]


def test_bundle_missing_file(bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        (broken / name).write_bytes((bundle / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        DreamPipeline.from_pretrained(broken, device="cpu")


def test_inpainting_keeps_known_pixels(pipe):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    mask = outpaint_mask(32, (8, 8, 24, 24))  # keep the centre, generate the border
    res = pipe(PROMPTS[:2], image=img, mask=mask, num_candidates=2, threshold=1, steps=3, progress=False)
    src = np.asarray(img)
    for out in res.images:
        arr = np.asarray(out)
        assert np.array_equal(arr[8:24, 8:24], src[8:24, 8:24])
        assert not np.array_equal(arr[:8], src[:8])
    with pytest.raises(ValueError, match="image is 32x32 but mask is 16x16"):
        pipe(PROMPTS[:1], image=img, mask=Image.new("L", (16, 16), 255), progress=False)
    with pytest.raises(ValueError, match="selects no region"):
        pipe(PROMPTS[:1], image=img, mask=Image.new("L", (32, 32), 0), progress=False)


def test_cli_writes_pngs_grid_and_json(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(
        [
            "sample",
            "--checkpoint",
            str(bundle),
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--out",
            str(out),
            "--steps",
            "4",
            "--num-candidates",
            "2",
            "--threshold",
            "2",
            "--seed",
            "3",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    meta = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in meta["samples"]] == PROMPTS[:2]
    assert [s["seed"] for s in meta["samples"]] == [3, 4]
    for s in meta["samples"]:
        assert len(s["candidate_scores"]) == 2 and s["chosen"] in (0, 1)
        assert Image.open(out / s["file"]).size == (32, 32)
    assert Image.open(out / "grid.png").size[0] > 64
    assert meta["timings"]["total_s"] > 0


def test_cli_bad_inputs(bundle, tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a red circle\n\xff\xfe broken\n")
    rc = cli_main(["sample", "--checkpoint", str(bundle), "--prompts", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not UTF-8" in err and "line 2" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    rc = cli_main(["sample", "--checkpoint", str(bundle), "--prompts", str(empty), "--out", str(tmp_path / "o")])
    assert rc == 2 and "holds no prompts" in capsys.readouterr().err
    rc = cli_main(["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli_main(
        [
            "sample",
            "--checkpoint",
            str(bundle),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "o"),
            "--num-candidates",
            "2",
            "--threshold",
            "9",
            "--steps",
            "4",
        ]
    )
    assert rc == 2 and "threshold must be in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
