"""InfoNCE: equals a naive reference, filtered samples have no effect, and 2 gloo ranks with
gather-with-grad give the single-process gradients of the concatenated batch."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dream_fast.model.contrastive import clip_loss


def naive_clip_loss(img, txt, valid, logit_scale):
    """Loop-based reference: only valid samples, as queries and as keys."""
    idx = [i for i in range(len(valid)) if valid[i]]
    if not idx:
        return torch.zeros((), dtype=torch.float64)
    img = torch.nn.functional.normalize(img[idx].double(), dim=-1)
    txt = torch.nn.functional.normalize(txt[idx].double(), dim=-1)
    s = math.exp(min(float(logit_scale), math.log(100)))
    total = 0.0
    for i in range(len(idx)):
        li = [s * float(img[i] @ txt[j]) for j in range(len(idx))]
        lt = [s * float(txt[i] @ img[j]) for j in range(len(idx))]
        lse = lambda xs: max(xs) + math.log(sum(math.exp(x - max(xs)) for x in xs))
        total += 0.5 * ((lse(li) - li[i]) + (lse(lt) - lt[i]))
    return torch.tensor(total / len(idx), dtype=torch.float64)


def _feats(B=7, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)


@pytest.mark.parametrize("valid", [[1] * 7, [1, 0, 1, 1, 0, 1, 1], [0] * 7])
def test_matches_naive(valid):
    img, txt = _feats()
    v = torch.tensor(valid, dtype=torch.bool)
    scale = torch.tensor(math.log(1 / 0.07))
    got = clip_loss(img, txt, v, scale)
    torch.testing.assert_close(got.double(), naive_clip_loss(img, txt, v, scale), atol=1e-5, rtol=1e-5)


def test_filtered_samples_have_no_effect():
    img, txt = _feats()
    v = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    scale = torch.tensor(2.0)
    base = clip_loss(img, txt, v, scale)
    img2, txt2 = img.clone().requires_grad_(), txt.clone()
    img2.data[1] += 3.0
    txt2[4] = -txt2[4]
    out = clip_loss(img2, txt2, v, scale)
    torch.testing.assert_close(base, out)
    out.backward()
    assert img2.grad[1].abs().max() == 0 and img2.grad[4].abs().max() == 0
    assert img2.grad[0].abs().max() > 0


def test_all_invalid_is_zero_without_nan():
    img, txt = _feats()
    img.requires_grad_()
    loss = clip_loss(img, txt, torch.zeros(7, dtype=torch.bool), torch.tensor(2.0))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(img.grad).all() and img.grad.abs().max() == 0


def test_logit_scale_clamped():
    img, txt = _feats()
    v = torch.ones(7, dtype=torch.bool)
    a = clip_loss(img, txt, v, torch.tensor(math.log(100)))
    b = clip_loss(img, txt, v, torch.tensor(10.0))
    torch.testing.assert_close(a, b)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, img, txt, valid, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = img.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    w = torch.nn.Linear(img.shape[1], img.shape[1])
    torch.manual_seed(0)
    torch.nn.init.normal_(w.weight)
    torch.nn.init.zeros_(w.bias)
    scale = torch.nn.Parameter(torch.tensor(2.5))
    loss = clip_loss(w(img[sl]), txt[sl], valid[sl], scale)
    loss.backward()
    grads = [w.weight.grad.clone(), scale.grad.clone()]
    for gr in grads:  # data-parallel average, as DeepSpeed/DDP do
        dist.all_reduce(gr)
        gr /= world
    if rank == 0:
        out_q.put((loss.item(), grads[0].tolist(), grads[1].item()))  # by value: no shared memory
        out_q.close()
        out_q.join_thread()  # the result is in the pipe before this process leaves
    dist.barrier()  # no rank tears down while its peer still talks to it
    dist.destroy_process_group()
    # Leave without C++ static destructors: a gloo thread can abort at interpreter shutdown
    # ("terminate called without an active exception", seen once in CI) after all work is done.
    os._exit(0)


@pytest.mark.distributed
def test_two_gloo_ranks_match_single_process():
    img, txt = _feats(B=8, E=6, seed=3)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, img, txt, valid, q)) for r in range(2)]
    for p in procs:
        p.start()
    loss_d, gw_d, gs_d = q.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    w = torch.nn.Linear(6, 6)
    torch.manual_seed(0)
    torch.nn.init.normal_(w.weight)
    torch.nn.init.zeros_(w.bias)
    scale = torch.nn.Parameter(torch.tensor(2.5))
    loss = clip_loss(w(img), txt, valid, scale)
    loss.backward()
    torch.testing.assert_close(torch.tensor(loss_d), loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(gw_d), w.weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(gs_d), scale.grad, atol=1e-6, rtol=1e-5)
