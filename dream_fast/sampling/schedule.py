"""Host-side tables of the MAR-style generation loop: masked counts per step (cosine schedule) and the
classifier-free-guidance scale per step (linear ramp or constant), computed once before sampling.

docs/design.md §1.9: after step k the masked count is floor(U·cos(π/2·(k+1)/N)), clamped to
[1, currently-masked − 1]; the last step fills everything. U is the number of tokens to generate
(L for text-to-image, fewer for inpainting).
"""

from __future__ import annotations

import math

CFG_SCHEDULES = ("linear", "constant")


def masking_schedule(num_tokens: int, num_steps: int) -> list[int]:
    """Masked counts m_0..m_N (m_0 = num_tokens, m_N = 0); step k predicts m_k − m_{k+1} tokens.

    With fewer tokens than steps the clamp keeps one token masked until the last step, so some
    steps predict nothing (the sampler skips them).
    """
    if num_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_steps}")
    if num_tokens < 1:
        raise ValueError(f"there must be at least one token to generate, got {num_tokens}")
    masked = [num_tokens]
    for k in range(num_steps):
        if k == num_steps - 1:
            masked.append(0)
            continue
        nxt = math.floor(num_tokens * math.cos(math.pi / 2.0 * (k + 1) / num_steps))
        masked.append(max(1, min(masked[-1] - 1, nxt)))
    return masked


def cfg_schedule(cfg: float, masked: list[int], kind: str = "linear") -> list[float]:
    """Guidance scale of each step: linear s_k = 1 + (s − 1)(U − m_{k+1})/U, or constant s."""
    if kind not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule {kind!r} unknown; allowed: {list(CFG_SCHEDULES)}")
    num_tokens = masked[0]
    if kind == "constant":
        return [float(cfg)] * (len(masked) - 1)
    return [1.0 + (cfg - 1.0) * (num_tokens - m_next) / num_tokens for m_next in masked[1:]]
