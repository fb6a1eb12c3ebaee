"""Zero-shot, retrieval and alignment: exact values on hand-built embeddings, ranges on a tiny model."""

import pytest
import torch
import torch.nn.functional as F

from dream_fast.config import get_preset
from dream_fast.data import BPETokenizer, make_sample
from dream_fast.eval.features import EvalImages, image_embeddings, images_to_tokens, to_image_batch
from dream_fast.eval.retrieval import alignment_from_embeddings, alignment_score, retrieval, retrieval_metrics
from dream_fast.eval.zeroshot import (
    class_text_embeddings,
    prompts_from_templates,
    shapes_class_prompts,
    zero_shot_classify,
    zero_shot_from_embeddings,
)
from dream_fast.model.dream import build_model


def test_retrieval_metrics_exact_on_hand_built_embeddings():
    eye = torch.eye(4)
    # texts 0, 1 match their images; texts 2 and 3 are swapped
    txt = eye[[0, 1, 3, 2]]
    r = retrieval_metrics(eye, txt, ks=(1,))
    assert r["i2t_r1"] == 0.5 and r["t2i_r1"] == 0.5
    # one-directional case: image 0 is close to text 0 and text 1, text 1 is closer
    img = F.normalize(torch.tensor([[0.9, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    txt = torch.eye(3)
    r = retrieval_metrics(img, txt, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["i2t_r2"] == 1.0
    assert r["t2i_r1"] == 1.0  # text 1's best image is image 1 (cos 1 > 0.74)
    # grouping identical captions: image 0 retrieving text 1 counts when they share a group
    r = retrieval_metrics(img, txt, ks=(1,), groups=["a", "a", "b"])
    assert r["i2t_r1"] == 1.0


def test_retrieval_metrics_perfect_and_shapes_checked():
    e = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    r = retrieval_metrics(e, e)
    assert r["i2t_r1"] == r["t2i_r1"] == r["i2t_r5"] == 1.0 and r["n"] == 10
    with pytest.raises(ValueError, match="matched"):
        retrieval_metrics(e, e[:5])


def test_zero_shot_and_alignment_exact_on_hand_built_embeddings():
    cls = torch.eye(3)
    img = torch.tensor([[2.0, 0.1, 0], [0, 0, 5.0], [0.1, 1.0, 0], [1.0, 0, 0.2]])
    res = zero_shot_from_embeddings(img, cls, torch.tensor([0, 2, 1, 2]), ["a", "b", "c"])
    assert res["predictions"] == [0, 2, 1, 0]
    assert res["top1"] == 0.75 and res["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.5}
    per = alignment_from_embeddings(
        torch.tensor([[1.0, 0], [1.0, 1.0]]), torch.tensor([[3.0, 0], [-1.0, -1.0]])
    )
    torch.testing.assert_close(per, torch.tensor([100.0, -100.0]))


def test_prompts_from_templates_and_shapes_prompts():
    assert prompts_from_templates(["cat", "dog"], ["a {}.", "the {} here"]) == [
        ["a cat.", "the cat here"],
        ["a dog.", "the dog here"],
    ]
    with pytest.raises(ValueError, match="exactly one"):
        prompts_from_templates(["cat"], ["no slot"])
    names, prompts = shapes_class_prompts("colour_id", per_class=5)
    assert len(names) == len(prompts) == 8 and all(len(p) == 5 for p in prompts)
    assert all(f" {n} " in p for n, ps in zip(names, prompts) for p in ps)
    names, prompts = shapes_class_prompts("position", per_class=3)
    assert "in the top left" in prompts[0][0]


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny")
    cfg.model.enc_depth = cfg.model.dec_depth = cfg.model.text_depth = 1
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    caps = [make_sample(0, "train", i)[1] for i in range(300)]
    tok = BPETokenizer.train(caps, 300)
    model.set_text_specials(tok.eot_id, tok.encode([""], cfg.model.text_context)[0])
    return model, tok


def test_tiny_model_zero_shot_retrieval_alignment_in_range(tiny, tmp_path):
    model, tok = tiny
    d = tmp_path / "imgs"
    d.mkdir()
    ims, caps = [], []
    for i in range(24):
        im, cap, meta = make_sample(0, "val", i)
        im.save(d / f"{i:03d}.png")
        (d / f"{i:03d}.txt").write_text(cap)
        (d / f"{i:03d}.json").write_text(__import__("json").dumps(meta))
        ims.append(im)
        caps.append(cap)
    data = EvalImages(d, 32, label_key="shape_id")
    assert data.kind == "flat"
    names, prompts = shapes_class_prompts("shape_id", per_class=4)
    zs = zero_shot_classify(model, tok, data, prompts, "shape_id", names)
    assert zs["n"] == 24 and 0.0 <= zs["top1"] <= zs["top5"] <= 1.0
    cls = class_text_embeddings(model, tok, prompts)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(3))
    r = retrieval(model, tok, data)
    assert all(0.0 <= r[k] <= 1.0 for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"))
    assert r["i2t_r1"] <= r["i2t_r5"]
    al = alignment_score(model, tok, ims, caps)
    assert al["n"] == 24 and -100.0 <= al["score"] <= 100.0
    # the same pairs as a tensor batch give the same score
    x = to_image_batch(ims, 32)
    emb = image_embeddings(model, images_to_tokens(model, x))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(24))
    assert alignment_score(model, tok, x, caps)["score"] == pytest.approx(al["score"], abs=1e-4)
