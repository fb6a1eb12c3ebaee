"""The DREAM model in PyTorch: encoder, contrastive towers, decoder, diffusion head, masking.

`build_model(cfg.model, cfg.loss)` is the entry point; see docs/design.md §1 for the exact formulas.
"""

from dream_fast.model.diffloss import DiffLoss
from dream_fast.model.diffusion import GaussianDiffusion
from dream_fast.model.dream import DREAM, TextCond, build_model, count_params, flops_per_sample
from dream_fast.model.image_tokenizer import PixelTokenizer, VAETokenizer, build_image_tokenizer
from dream_fast.model.masking import mask_mu, num_masked, random_orders, sample_mask_ratio, split_order
from dream_fast.model.text import T5Conditioner, TextAligner, TextTower

__all__ = [
    "DREAM", "DiffLoss", "GaussianDiffusion", "PixelTokenizer", "T5Conditioner", "TextAligner", "TextCond",
    "TextTower", "VAETokenizer", "build_image_tokenizer", "build_model", "count_params", "flops_per_sample",
    "mask_mu", "num_masked", "random_orders", "sample_mask_ratio", "split_order",
]  # fmt: skip
