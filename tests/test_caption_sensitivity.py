"""benchmarks/caption_sensitivity: a decoder cut off from the text shows no sensitivity to a wrong
caption; one that reads the text does."""

import math

import torch

from benchmarks.caption_sensitivity import sensitivity
from dream_fast.config import get_preset
from dream_fast.data import BPETokenizer, make_sample
from dream_fast.model.dream import build_model
from dream_fast.pretrained import save_pretrained


def _bundle(path, cut_text: bool):
    cfg = get_preset("tiny")
    cfg.model.enc_depth = cfg.model.dec_depth = cfg.model.text_depth = 1
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    with torch.no_grad():
        for p in model.diffloss.parameters():  # leave the zero init: z must matter to the head
            p.add_(0.05 * torch.randn_like(p))
        if cut_text:
            for blk in model.decoder_blocks:
                blk.cross.proj.weight.zero_()
                blk.cross.proj.bias.zero_()
    tok = BPETokenizer.train([make_sample(0, "train", i)[1] for i in range(200)], 300)
    model.set_text_specials(tok.eot_id, tok.encode([""], cfg.model.text_context)[0])
    return save_pretrained(model.state_dict(), cfg, tok, path)


def test_detects_whether_the_decoder_reads_the_caption(tmp_path):
    deaf = sensitivity(str(_bundle(tmp_path / "deaf", cut_text=True)), n=16, reps=1)
    assert all(math.isfinite(v) for v in deaf.values())
    assert 0 < deaf["shape_token_fraction"] < 0.5
    assert (deaf["shape mse, right"] == deaf["shape mse, wrong colour"] == deaf["shape mse, wrong position"]
            == deaf["shape mse, wrong shape"])
    for word in ("colour", "position", "shape"):  # the words differ; the decoder just cannot see them
        assert deaf[f"tower {word}-swap distance"] > 0
    reads = sensitivity(str(_bundle(tmp_path / "reads", cut_text=False)), n=16, reps=1)
    assert reads["shape mse, right"] != reads["shape mse, wrong colour"]
