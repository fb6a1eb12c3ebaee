"""Attention backends agree with the fp32 math reference; unavailable ones are skipped with a reason."""

import pytest
import torch

from dream_fast.model.attention import attention, attention_math, available_backends


def _qkv(B=2, L=13, S=9, H=3, Dh=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    mk = lambda n: torch.randn(B, n, H, Dh, generator=g).to(device, dtype)
    return mk(L), mk(S), mk(S)


@pytest.mark.parametrize("backend", ["sdpa", "explicit", "auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_backends_match_math(backend, causal, masked):
    q, k, v = _qkv(S=13)
    mask = None
    if masked:
        mask = torch.ones(2, 13, dtype=torch.bool)
        mask[0, 7:] = False
        mask[1, 10:] = False
    ref = attention_math(q.double(), k.double(), v.double(), mask, causal)
    out = attention(q, k, v, mask, causal, backend=backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_masked_keys_have_no_effect(backend):
    q, k, v = _qkv()
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 5:] = False
    out1 = attention(q, k, v, mask, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:] += 100.0
    v2[:, 5:] -= 100.0
    torch.testing.assert_close(out1, attention(q, k2, v2, mask, backend=backend))


def test_gradients_of_explicit_match_sdpa():
    q, k, v = (t.requires_grad_() for t in _qkv(S=13))
    g = torch.randn_like(q)
    grads = []
    for backend in ("sdpa", "explicit"):
        attention(q, k, v, causal=True, backend=backend).backward(g)
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_request_falls_back_on_cpu():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, backend="flash"), attention(q, k, v, backend="sdpa"))


def test_unknown_backend_is_a_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="allowed"):
        attention(q, k, v, backend="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_optional_backends_on_gpu(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: flash-attn and xformers kernels run only on GPUs")
    if not available_backends()[backend]:
        pytest.skip(f"{backend} is not installed (optional extra `gpu`)")
    q, k, v = _qkv(dtype=torch.bfloat16, device="cuda", S=13)
    ref = attention_math(q.float(), k.float(), v.float())
    torch.testing.assert_close(attention(q, k, v, backend=backend).float(), ref, atol=2e-2, rtol=2e-2)
