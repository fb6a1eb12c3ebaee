"""Shared pieces of the sampling tests: a random tiny DREAM, a naive (loop-per-candidate, unbatched)
reference of MAR generation + SAD, and a CPU audit that fails on host-synchronising aten ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dream_fast.config import get_preset
from dream_fast.model.diffusion import ddpm_step_reference
from dream_fast.model.dream import build_model
from dream_fast.sampling.schedule import masking_schedule

aten = torch.ops.aten


def tiny_model(seed: int = 0, depth: int = 1, sampling_steps: int = 10, text_cond: str = "tower"):
    """Random tiny-preset DREAM in eval mode; the zero-initialised head gets small random weights so
    its outputs (and hence the samples) depend on the condition."""
    cfg = get_preset("tiny")
    m = cfg.model
    m.enc_depth = m.dec_depth = depth
    m.num_sampling_steps = sampling_steps
    m.text_cond = text_cond
    torch.manual_seed(seed)
    model = build_model(m, cfg.loss)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.02 * torch.randn_like(p))
        # running stats that are not the init values, so eval-mode BatchNorm matters
        for mod in model.image_proj.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return cfg, model.eval()


def prompt_ids(cfg, B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((B, cfg.model.text_context), 2, dtype=torch.long)
    ids[:, 0] = 1
    ids[:, 1:6] = torch.randint(3, cfg.model.vocab_size, (B, 5), generator=g)
    return ids


# ----------------------------------------------------------------------------- naive reference


@torch.no_grad()
def naive_sample(
    model,
    cond,
    order_L,
    noise_KLJC,
    steps,
    cfg,
    temperature=1.0,
    threshold=None,
    greedy=False,
    text_emb_P=None,
    known_1LC=None,
    num_unknown=None,
    cfg_kind="linear",
):
    """One prompt, candidates one at a time, cond and uncond as separate forwards, the head called
    through its own forward with per-row timesteps: the textbook loop the sampler must equal."""
    L, C = model.seq_len, model.token_dim
    U = L if num_unknown is None else num_unknown
    net, diff = model.diffloss.net, model.diffloss.sample_diffusion
    table, tmap = diff.step_table(), diff.timestep_map
    S = diff.num_timesteps
    masked = masking_schedule(U, steps)
    null = model.null_condition(1)
    K = noise_KLJC.shape[0]
    txt = None if text_emb_P is None else F.normalize(text_emb_P.float(), dim=-1)

    def predict(tokens, k, noise_LJC):
        m0, m1 = masked[k], masked[k + 1]
        if m0 == m1:
            return tokens
        keep = order_L[None, m0:]
        pred = order_L[m1:m0]
        enc = model.encode(tokens, keep)
        zc = model.decode(enc, keep, cond)[0, pred]
        zu = model.decode(enc, keep, null)[0, pred]
        s_k = cfg if cfg_kind == "constant" else 1 + (cfg - 1) * (U - m1) / U
        n = pred.numel()
        x = noise_LJC[pred, 0]
        for it in range(S):
            i = S - 1 - it
            if cfg > 1:
                out = net(torch.cat([x, x]), tmap[i].expand(2 * n), torch.cat([zc, zu]))
                out_c, out_u, cfg_n = out[:n], out[n:], torch.full((n,), float(s_k))
            else:
                out_c = out_u = net(x, tmap[i].expand(n), zc)
                cfg_n = torch.ones(n)
            x = ddpm_step_reference(out_c, out_u, x, noise_LJC[pred, it + 1], table[i], cfg_n, temperature)
        new = tokens.clone()
        new[0, pred] = x
        return new

    def score(tokens, m):
        enc = model.encode(tokens, order_L[None, m:])
        img = F.normalize(model.image_embedding(enc).float(), dim=-1)[0]
        return float((img * txt).sum())

    start = torch.zeros(1, L, C) if known_1LC is None else known_1LC.clone()
    cands = [start.clone() for _ in range(K)]
    scores, chosen, greedy_chosen = None, None, []
    tok = None
    for k in range(steps):
        if threshold is None or k < threshold:
            cands = [predict(c, k, noise_KLJC[j]) for j, c in enumerate(cands)]
            continue
        if tok is None:  # first step at or after T: SAD selection
            scores = [score(c, masked[k]) for c in cands]
            chosen = max(range(K), key=lambda j: scores[j])
            tok, continue_noise = cands[chosen], noise_KLJC[chosen]
        if greedy:
            if masked[k] == masked[k + 1]:
                continue
            fills = [predict(tok, k, noise_KLJC[f]) for f in range(K)]
            fs = [score(f, masked[k + 1]) for f in fills]
            best = max(range(K), key=lambda f: fs[f])
            greedy_chosen.append(best)
            tok = fills[best]
        else:
            tok = predict(tok, k, continue_noise)
    if threshold is None:
        tok = cands[0]
    return tok, scores, chosen, greedy_chosen


# ----------------------------------------------------------------------------- sync audit

_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t)
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.repeat_interleave.Tensor,
    aten._unique2.default,
    aten.unique_consecutive.default,
}


class HostSyncError(RuntimeError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raise on every aten op that would make a CUDA host wait for the device (CPU stand-in for
    torch.cuda.set_sync_debug_mode("error")), including boolean-mask indexing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            raise HostSyncError(f"host-synchronising op inside a sampling step: {func}")
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype == torch.bool for t in indices):
                raise HostSyncError(f"boolean-mask indexing ({func}) inside a sampling step")
        return func(*args, **kwargs)
