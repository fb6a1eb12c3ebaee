"""Fused Triton kernels with their PyTorch references (installed as `dream_fast.kernels`).

Each op file holds the kernel(s), launcher, autograd Function and the reference; `dispatch`
chooses the provider. Import ops from here so switching provider changes no model code.
"""

from dream_fast.kernels.dispatch import requested_provider, set_provider, use_triton

__all__ = ["requested_provider", "set_provider", "use_triton"]
