"""benchmarks/caption_sensitivity: a decoder cut off from the text shows no sensitivity to a wrong
caption; one that reads the text does."""

import math

import torch
from bundle_helpers import tiny_bundle

from benchmarks.caption_sensitivity import sensitivity


def _bundle(path, cut_text: bool):
    def prepare(model):
        for p in model.diffloss.parameters():  # leave the zero init: z must matter to the head
            p.add_(0.05 * torch.randn_like(p))
        if cut_text:
            for blk in model.decoder_blocks:
                blk.cross.proj.weight.zero_()
                blk.cross.proj.bias.zero_()

    return tiny_bundle(path, prepare)


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
