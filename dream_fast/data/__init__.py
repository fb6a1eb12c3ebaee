"""Data for dream_fast: the embedded shapes dataset, webdataset shard reading, transforms, BPE.

Public names are re-exported here; see each module for details.
"""

from dream_fast.data.bpe import EOT_TOKEN, PAD_TOKEN, SOT_TOKEN, BPETokenizer
from dream_fast.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COMBOS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPEC,
    SPLITS,
    ImageAttrs,
    ShapeAttrs,
    ShapesSpec,
    attrs_from_meta,
    attrs_meta,
    caption,
    is_heldout,
    make_sample,
    render,
    sample_attributes,
    sample_rng,
    shard_pattern,
    write_shapes_shards,
)
from dream_fast.data.shards import (
    IMAGE_EXTS,
    ImageTextShards,
    collate,
    count_samples,
    expand_urls,
    iter_captions,
    make_loader,
    train_tokenizer_from_shards,
)
from dream_fast.data.transforms import adm_center_crop, caption_grid, hflip, preprocess, to_pil, to_tensor

__all__ = [
    "BACKGROUNDS", "COLOURS", "EOT_TOKEN", "HELDOUT_COMBOS", "IMAGE_EXTS", "PAD_TOKEN", "POSITIONS",
    "SHAPES", "SIZES", "SOT_TOKEN", "SPEC", "SPLITS", "BPETokenizer", "ImageAttrs", "ImageTextShards",
    "ShapeAttrs", "ShapesSpec", "adm_center_crop", "attrs_from_meta", "attrs_meta",
    "caption", "caption_grid", "collate", "count_samples", "expand_urls", "hflip", "is_heldout",
    "iter_captions", "make_loader", "make_sample", "preprocess", "render", "sample_attributes",
    "sample_rng", "shard_pattern", "to_pil", "to_tensor", "train_tokenizer_from_shards",
    "write_shapes_shards",
]  # fmt: skip
