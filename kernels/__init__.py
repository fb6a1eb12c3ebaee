"""Fused Triton kernels with their PyTorch references (installed as `dream_fast.kernels`).

One module per op, named after it: `from dream_fast.kernels.adaln_block import adaln_block`.
Each holds the kernel(s), launcher, autograd Function and `<op>_reference`; `dispatch` chooses
the provider, so switching provider changes no model code. (Ops are not re-exported here: a
function named like its module would shadow the module attribute.)
"""

from dream_fast.kernels.dispatch import (
    deterministic,
    requested_provider,
    set_deterministic,
    set_provider,
    use_triton,
)

OPS = ("masked_gather", "decoder_fill", "adaln_block", "guided_ddpm_step")

__all__ = ["OPS", "deterministic", "requested_provider", "set_deterministic", "set_provider", "use_triton"]
