"""Fused Triton kernels with their PyTorch references (installed as `dream_fast.kernels`).

Each op file holds the kernel(s), launcher, autograd Function and the reference; `dispatch`
chooses the provider. Import ops from here so switching provider changes no model code.
"""

from dream_fast.kernels.adaln_block import adaln_block, adaln_block_reference
from dream_fast.kernels.decoder_fill import decoder_fill, decoder_fill_reference
from dream_fast.kernels.dispatch import requested_provider, set_provider, use_triton
from dream_fast.kernels.guided_ddpm_step import guided_ddpm_step, guided_ddpm_step_reference
from dream_fast.kernels.masked_gather import masked_gather, masked_gather_reference

OPS = ("masked_gather", "decoder_fill", "adaln_block", "guided_ddpm_step")

__all__ = [
    "OPS", "adaln_block", "adaln_block_reference", "decoder_fill", "decoder_fill_reference", "guided_ddpm_step",
    "guided_ddpm_step_reference", "masked_gather", "masked_gather_reference", "requested_provider",
    "set_provider", "use_triton",
]  # fmt: skip
