"""The generation loop (docs/design.md §1.9): static, host-sync-free MAR-style steps with classifier-free
guidance and Semantically Aligned Decoding (K candidates in one batched pass, greedy variant).

Every step's shapes are known on the host before sampling starts (`make_plan`): at step k the
masked set is order[:, :m_k] and the predicted tokens are the contiguous slice order[:, m_{k+1}:m_k],
so tokens are read and written by precomputed indices. All randomness (orders and the head's
noise) is drawn up front per (prompt, candidate) from seeded generators (`draw_noise`), which
makes K = 1 bit-identical to plain sampling and the batched K pass equal to K separate runs.
Steps use no `.item()`, `nonzero`, boolean indexing or data-dependent branches, so a whole plan
can be captured as CUDA graphs (`graphs.py`) and replayed.

Fast path (`DreamSampler(model, fast=True)`, the default; docs/design.md §1.9): the prompt does
not change during sampling, so each decoder block's cross-attention keys/values are computed once
per call (once per prompt, once for the shared empty caption), not at every step for every
candidate; rows that share a text context are attended as one longer query sequence; block 0's
self-attention (identical for the conditional and unconditional rows) runs once; the last decoder
block runs only at the tokens predicted this step; the head's modulations of all its timesteps come
from one GEMM. `fast=False` is the plain eager path (the model's own `decode`, the head's modules):
the reference the fast path is tested against (tests/test_sampling_fast_path.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dream_fast.kernels.decoder_fill import decoder_fill
from dream_fast.kernels.dispatch import use_triton
from dream_fast.kernels.guided_ddpm_step import guided_ddpm_step
from dream_fast.model.attention import attention
from dream_fast.model.dream import DREAM, TextCond
from dream_fast.model.masking import random_orders
from dream_fast.sampling.schedule import CFG_SCHEDULES, cfg_schedule, masking_schedule

# ----------------------------------------------------------------------------- randomness


def candidate_seed(seed: int, candidate: int) -> int:
    """Seed of candidate j's noise for a prompt sampled with `seed` (independent streams)."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), 1 + candidate]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class SampleNoise:
    """All randomness of one sampling call, drawn before the first step.

    order_BL: generation order per prompt (the first `num_unknown` entries are generated, the rest
    are known tokens, visible from the start: inpainting). noise_BKLJC: per prompt, candidate and
    token position, the head's initial x (j = 0) and its J − 1 = S step noises. Memory:
    B·K·L·(S + 1)·C floats.
    """

    order_BL: torch.Tensor
    noise_BKLJC: torch.Tensor
    num_unknown: int

    @property
    def batch(self) -> int:
        return self.order_BL.shape[0]

    @property
    def candidates(self) -> int:
        return self.noise_BKLJC.shape[1]

    def candidate(self, j: int) -> SampleNoise:
        """The noise of candidate j alone: a plain (K = 1) run with it is that candidate's run."""
        return SampleNoise(self.order_BL, self.noise_BKLJC[:, j : j + 1], self.num_unknown)

    def prompts(self, rows: slice) -> SampleNoise:
        return SampleNoise(self.order_BL[rows], self.noise_BKLJC[rows], self.num_unknown)


def draw_noise(
    seeds: list[int],
    num_candidates: int,
    seq_len: int,
    token_dim: int,
    num_sampling_steps: int,
    device: torch.device | str = "cpu",
    unknown_idx: torch.Tensor | None = None,
) -> SampleNoise:
    """Orders and head noise for prompts with the given seeds (one seed per prompt).

    The order of prompt b comes from a generator seeded with seeds[b]; candidate j's noise from
    `candidate_seed(seeds[b], j)`, so candidate 0 of a K-candidate call draws exactly what a plain
    call draws. unknown_idx (U,) (inpainting): positions to generate; the other positions end
    each order in increasing position order.
    """
    if not seeds:
        raise ValueError("draw_noise needs at least one seed (one per prompt)")
    device = torch.device(device)
    if unknown_idx is None:
        known_idx = torch.empty(0, dtype=torch.long)
        unknown = torch.arange(seq_len)
    else:
        unknown = unknown_idx.to("cpu", torch.long).reshape(-1)
        is_known = torch.ones(seq_len, dtype=torch.bool)
        is_known[unknown] = False
        known_idx = torch.arange(seq_len)[is_known]  # host-side setup, not a sampling step
    U = unknown.numel()
    orders, noises = [], []
    for s in seeds:
        g = torch.Generator(device=device).manual_seed(int(s) & (2**63 - 1))
        perm = random_orders(1, U, device=device, generator=g)[0]
        orders.append(torch.cat([unknown.to(device)[perm], known_idx.to(device)]))
        per_cand = []
        for j in range(num_candidates):
            gj = torch.Generator(device=device).manual_seed(candidate_seed(s, j))
            per_cand.append(torch.randn(seq_len, num_sampling_steps + 1, token_dim, device=device, generator=gj))
        noises.append(torch.stack(per_cand))
    return SampleNoise(torch.stack(orders), torch.stack(noises), U)


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StepSpec:
    """One generation step with its static shapes: `rows` state rows enter; with `select` they are
    B·K candidates scored on this step's encoder output and cut to the best B; the step's tokens
    are then filled `fillings` times per row (K at SAD's step 0 and greedy SAD's steps from T, else 1)."""

    k: int
    m_now: int
    m_next: int
    rows: int
    select: bool
    fillings: int


@dataclass(frozen=True)
class Plan:
    batch: int
    candidates: int
    seq_len: int
    num_unknown: int
    steps: int
    threshold: int | None
    greedy: bool
    guided: bool
    masked: tuple[int, ...]
    specs: tuple[StepSpec, ...]
    final_select: bool  # greedy: the last step's K fillings are scored by one more encoder pass


def make_plan(
    batch: int,
    candidates: int,
    seq_len: int,
    num_unknown: int,
    steps: int,
    threshold: int | None,
    greedy: bool,
    guided: bool,
) -> Plan:
    """Host-side table of every step (shapes, selections); raises on impossible arguments."""
    if batch < 1:
        raise ValueError(f"need at least one prompt, got batch={batch}")
    if candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {candidates}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sad = threshold is not None
    if candidates > 1 and not sad:
        raise ValueError(f"num_candidates={candidates} needs a SAD threshold in [1, steps-1={steps - 1}]")
    if sad and not 1 <= threshold < steps:
        raise ValueError(f"threshold must be in [1, steps-1={steps - 1}] (steps={steps}), got {threshold}")
    masked = masking_schedule(num_unknown, steps)
    B, K = batch, candidates
    # Until step 0 has run, the K candidates of a prompt hold identical tokens (the same known
    # tokens, the same order): step 0 runs the encoder and decoder once per prompt and fills its
    # tokens K times (candidate j's noise), like a greedy step. Candidates exist from then on.
    rows, pending, started = B, False, False  # pending: B*K candidate rows await selection
    specs = []
    for k in range(steps):
        if masked[k] == masked[k + 1]:
            continue  # the clamp left nothing to predict (fewer tokens than steps)
        select = pending and k >= threshold
        fills = sad and (not started or (greedy and k >= threshold))
        specs.append(StepSpec(k, masked[k], masked[k + 1], rows, select, K if fills else 1))
        if select:
            rows, pending = B, False
        if fills:
            rows, pending, started = B * K, True, True
    return Plan(
        B,
        K,
        seq_len,
        num_unknown,
        steps,
        threshold,
        greedy,
        guided,
        tuple(masked),
        tuple(specs),
        final_select=pending,
    )


# ----------------------------------------------------------------------------- result


@dataclass
class SampleResult:
    """tokens_BLC: the chosen sample per prompt. scores_BK: cosine text-image score of each
    candidate at step T (None without SAD); chosen_B: the kept candidate. greedy_*: per later
    greedy selection, the K fillings' scores and the kept filling."""

    tokens_BLC: torch.Tensor
    scores_BK: torch.Tensor | None = None
    chosen_B: torch.Tensor | None = None
    greedy_scores: list[torch.Tensor] = field(default_factory=list)
    greedy_chosen: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------- sampler


class DreamSampler:
    """Runs plans on one DREAM model; caches the head's per-model tables and the CUDA graphs.

    use_cuda_graphs: capture each plan's steps once per shape and replay them (CUDA only; CPU is
    always eager). fast: the per-prompt caches and trimmed decoder of the module docstring (False:
    the plain eager path, every fast path off). compile: "off", "block" or "step"
    (dream_fast/compile.py; torch.compile of the head's loop body or of the whole step).
    """

    # at most this many modulation values are produced by one batched GEMM (memory bound)
    MOD_CHUNK_ELEMS = 1 << 23

    def __init__(self, model: DREAM, use_cuda_graphs: bool = True, fast: bool = True, compile: str = "off"):
        from dream_fast.compile import check_mode

        self.model = model
        self.use_cuda_graphs = use_cuda_graphs
        self.fast = bool(fast)
        self.compile = check_mode(compile, "sample.compile")
        self._compiled_fns: dict[str, object] = {}
        self._tables: dict[tuple, dict[str, torch.Tensor]] = {}
        self._graphs = None

    # -- per-model constants --------------------------------------------------------------
    def _head_tables(self, device: torch.device, dtype: torch.dtype) -> dict:
        """Per-model constants of the head, computed once instead of once per head call: timestep
        embeddings of every respaced step and the DDPM step table; for the CPU path also every
        Linear pre-transposed for addmm, every modulation Linear stacked into one GEMM (with the 1
        of (1 + scale) folded into its bias), and the step table folded into host floats."""
        key = (device, dtype)
        if key not in self._tables:
            net, diff = self.model.diffloss.net, self.model.diffloss.sample_diffusion
            with torch.no_grad():
                tmap = diff.timestep_map.to(device)
                step = diff.step_table()
                tab = {"temb_SW": net.time_embed(tmap).to(dtype), "step_S7": step.to(device)}
                if device.type == "cpu":
                    tab.update(self._lean_tables(dtype, step))
            self._tables[key] = tab
        return self._tables[key]

    def _lean_tables(self, dtype: torch.dtype, step_S7: torch.Tensor) -> dict:
        net = self.model.diffloss.net
        W = net.width

        def wt(lin):  # (in, out) contiguous: addmm(bias, x, wT) skips linear's transpose dispatch
            return lin.weight.detach().to(dtype).t().contiguous()

        def bias(lin):
            return lin.bias.detach().to(dtype)

        ws, bs = [], []
        for blk in [*net.blocks, net.final_layer]:
            b = blk.mod.bias.detach().clone()
            b[W : 2 * W] += 1.0  # chunks are (shift, scale[, gate])
            ws.append(blk.mod.weight.detach())
            bs.append(b)
        tab = {
            "mod_wT": torch.cat(ws).to(dtype).t().contiguous(),
            "mod_b": torch.cat(bs).to(dtype),
            "in_wT": wt(net.input_proj),
            "in_b": bias(net.input_proj),
            "blocks": [
                (
                    blk.in_ln.weight.detach().to(dtype),
                    blk.in_ln.bias.detach().to(dtype),
                    blk.in_ln.eps,
                    wt(blk.fc1),
                    bias(blk.fc1),
                    wt(blk.fc2),
                    bias(blk.fc2),
                )
                for blk in net.blocks
            ],
            "out_wT": wt(net.final_layer.linear),
            "out_b": bias(net.final_layer.linear),
            "out_eps": net.final_layer.norm.eps,
        }
        # x_prev = A·x − Bε·ε + nonzero·exp(a·v + b)·noise·τ: guided_ddpm_step's math with the
        # x0 and posterior-mean coefficients multiplied out and the variance interpolation
        # rewritten in v (CPU only: these are host floats, read once here, never inside a step).
        coefs = []
        for c0, c1, k1, k2, post_lv, log_beta, nonzero in step_S7.double().tolist():
            coefs.append((k1 * c0 + k2, k1 * c1, (log_beta - post_lv) / 4, (log_beta + post_lv) / 4, nonzero != 0))
        tab["ddpm"] = coefs
        tab["ddpm_t"] = [(*(torch.tensor(v, dtype=torch.float32) for v in c[:4]), c[4]) for c in coefs]
        return tab

    def invalidate(self) -> None:
        """Drop cached tables and graphs (call after changing the model's weights)."""
        self._tables.clear()
        self._graphs = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.z_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.z_proj.weight.device

    # -- public entry ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: TextCond,
        noise: SampleNoise,
        steps: int,
        cfg: float = 1.0,
        cfg_schedule_kind: str = "linear",
        temperature: float = 1.0,
        threshold: int | None = None,
        greedy: bool = False,
        text_emb_BP: torch.Tensor | None = None,
        known_tokens_BLC: torch.Tensor | None = None,
    ) -> SampleResult:
        """Generate token grids for B prompts.

        cond: decoder text condition of the B prompts (model.text_condition). noise: from
        `draw_noise` (its K = number of candidates). threshold: SAD step T (None: plain sampling,
        K must be 1). text_emb_BP: the prompts' contrastive text embeddings (model.text_features
        ids)[0]), needed with SAD. known_tokens_BLC: tokens of the known region (inpainting; the
        positions after the first noise.num_unknown of each order are read from it).
        """
        model = self.model
        if model.training:
            raise ValueError(
                "the model is in training mode; call model.eval() before sampling "
                "(BatchNorm running statistics, no dropout)"
            )
        if cfg < 1.0:
            raise ValueError(f"cfg must be >= 1.0, got {cfg}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if cfg_schedule_kind not in CFG_SCHEDULES:
            raise ValueError(f"cfg schedule {cfg_schedule_kind!r} unknown; allowed: {list(CFG_SCHEDULES)}")
        B, K = noise.batch, noise.candidates
        L, C = model.seq_len, model.token_dim
        S = model.diffloss.sample_diffusion.num_timesteps
        if tuple(noise.noise_BKLJC.shape[2:]) != (L, S + 1, C):
            raise ValueError(
                f"noise has shape {tuple(noise.noise_BKLJC.shape)}; this model needs (B, K, L={L}, "
                f"num_sampling_steps+1={S + 1}, C={C})"
            )
        if cond.tokens.shape[0] != B:
            raise ValueError(f"cond has {cond.tokens.shape[0]} rows but the noise is for {B} prompts")
        guided = cfg > 1.0
        plan = make_plan(B, K, L, noise.num_unknown, steps, threshold, greedy, guided)
        if threshold is not None and text_emb_BP is None:
            raise ValueError("SAD (a threshold) needs text_emb_BP, the prompts' contrastive text embeddings")
        ctx = self._context(plan, cond, noise, cfg, cfg_schedule_kind, temperature, text_emb_BP, known_tokens_BLC)
        if self.use_cuda_graphs and self.device.type == "cuda":
            from dream_fast.sampling.graphs import PlanGraphs

            if self._graphs is None:
                self._graphs = PlanGraphs()
            out = self._graphs.run(self, plan, ctx)
        else:
            out = self.run_plan(plan, ctx)
        return self._result(plan, out)

    # -- per-call constants ---------------------------------------------------------------
    def _context(self, plan, cond, noise, cfg, cfg_kind, temperature, text_emb_BP, known) -> dict[str, torch.Tensor]:
        """Every tensor a step reads, by name (the CUDA-graph runner copies them into static buffers)."""
        dev, dt = self.device, self.dtype
        B, K, L, C = plan.batch, plan.candidates, plan.seq_len, self.model.token_dim
        sad = plan.threshold is not None
        J = noise.noise_BKLJC.shape[3]
        ctx: dict[str, torch.Tensor] = {}
        order = noise.order_BL.to(dev)
        ctx["order_B"] = order
        ctx["noise"] = noise.noise_BKLJC.to(dev, torch.float32).reshape(B * K * L, J, C)
        ctx["base_rows"] = torch.arange(B, device=dev) * K
        if known is None:
            tokens = torch.zeros(B, L, C, device=dev)
        else:
            if tuple(known.shape) != (B, L, C) and tuple(known.shape) != (1, L, C):
                raise ValueError(f"known_tokens_BLC must be (B={B} or 1, L={L}, C={C}), got {tuple(known.shape)}")
            tokens = known.to(dev, torch.float32).expand(B, L, C).clone()
        null = self.model.null_condition(B)
        rows_needed = {s.rows for s in plan.specs} | {B}
        if sad:
            ctx["order_BK"] = order.repeat_interleave(K, 0)
            ctx["fill_rows"] = torch.arange(B * K, device=dev)
            txt = F.normalize(text_emb_BP.to(dev).float(), dim=-1)
            ctx["text"] = txt.repeat_interleave(K, 0)
        ctx["noise_rows0"] = ctx["base_rows"].clone()
        ctx["tokens0"] = tokens
        ctx["cfg"] = torch.tensor(cfg_schedule(cfg, list(plan.masked), cfg_kind), dtype=torch.float32, device=dev)
        ctx["temperature"] = torch.tensor(float(temperature), dtype=torch.float32, device=dev)
        if self.fast:
            ctx.update(self._text_kv(cond, null, plan.guided))
            return ctx
        for R in sorted(rows_needed):
            rep = R // B
            ct, cm = cond.tokens.to(dev, dt), cond.mask.to(dev)
            nt, nm = null.tokens.to(dev, dt), null.mask.to(dev)
            if rep > 1:
                ct, cm = ct.repeat_interleave(rep, 0), cm.repeat_interleave(rep, 0)
                nt, nm = nt.repeat_interleave(rep, 0), nm.repeat_interleave(rep, 0)
            if plan.guided:  # one batched forward: rows [cond; uncond]
                ct, cm = torch.cat([ct, nt]), torch.cat([cm, nm])
            ctx[f"cond_tokens_{R}"], ctx[f"cond_mask_{R}"] = ct.contiguous(), cm.contiguous()
        return ctx

    def _text_kv(self, cond: TextCond, null: TextCond, guided: bool) -> dict[str, torch.Tensor]:
        """Each decoder block's cross-attention keys/values, once per prompt (B rows) and once for
        the empty caption (1 row, shared by every unconditional row): (depth, rows, T, 2·D)."""
        dev, dt = self.device, self.dtype
        blocks = self.model.decoder_blocks
        ct = cond.tokens.to(dev, dt)
        out = {
            "xkv_c": torch.stack([blk.cross.kv(ct) for blk in blocks]),
            "xmask_c": cond.mask.to(dev).contiguous(),
        }
        if guided:
            nt = null.tokens[:1].to(dev, dt)
            out["xkv_u"] = torch.stack([blk.cross.kv(nt) for blk in blocks])
            out["xmask_u"] = null.mask[:1].to(dev).contiguous()
        return out

    # -- the loop -------------------------------------------------------------------------
    def run_plan(self, plan: Plan, ctx: dict[str, torch.Tensor]) -> dict:
        """Eager execution of every step of `plan` (also what CUDA graphs capture, step by step)."""
        tokens, noise_rows = ctx["tokens0"], ctx["noise_rows0"]
        outs: list[dict[str, torch.Tensor]] = []
        for spec in plan.specs:
            tokens, noise_rows, sel = self.step(plan, spec, ctx, tokens, noise_rows)
            if sel:
                outs.append(sel)
        if plan.final_select:
            tokens, sel = self.final_select(plan, ctx, tokens)
            outs.append(sel)
        return {"tokens": tokens, "selections": outs}

    def _order(self, ctx: dict[str, torch.Tensor], plan: Plan, rows: int) -> torch.Tensor:
        return ctx["order_B"] if rows == plan.batch else ctx["order_BK"]

    def _select(self, plan: Plan, ctx, enc, tokens):
        """Score B·K candidate rows (encoder output of their decoded tokens) and keep the best per
        prompt; argmax + index_select on the device, no host sync."""
        B, K = plan.batch, plan.candidates
        img = F.normalize(self.model.image_embedding(enc).float(), dim=-1)
        scores_BK = (img * ctx["text"]).sum(-1).view(B, K)
        best_B = scores_BK.argmax(dim=1)
        rows_B = ctx["base_rows"] + best_B
        return rows_B, {"scores": scores_BK, "chosen": best_B}

    def step(
        self,
        plan: Plan,
        spec: StepSpec,
        ctx: dict[str, torch.Tensor],
        tokens_RLC: torch.Tensor,
        noise_rows_R: torch.Tensor,
    ):
        """One static step -> (tokens, noise rows, selection outputs or {})."""
        model = self.model
        dt = self.dtype
        B, L, C = plan.batch, plan.seq_len, model.token_dim
        R = spec.rows
        order = self._order(ctx, plan, R)
        keep = order[:, spec.m_now :]
        whole = self.compile == "step"
        encode = self._compiled("encode", model.encode) if whole else model.encode
        enc = encode(tokens_RLC.to(dt), keep)
        sel: dict[str, torch.Tensor] = {}
        if spec.select:
            rows_B, sel = self._select(plan, ctx, enc, tokens_RLC)
            tokens_RLC = tokens_RLC.index_select(0, rows_B)
            enc = enc.index_select(0, rows_B)
            noise_rows_R = noise_rows_R.index_select(0, rows_B)
            R = B
            order = ctx["order_B"]
            keep = order[:, spec.m_now :]
        pred = order[:, spec.m_next : spec.m_now]  # (R, n): this step's tokens
        n = pred.shape[1]
        if self.fast:
            decode = self._compiled("decode", self._decode_fast) if whole else self._decode_fast
            z_pred = decode(enc, keep, pred, ctx, plan.guided)  # (G·R, n, Dd)
            Dd = z_pred.shape[-1]
        else:
            cond = TextCond(ctx[f"cond_tokens_{R}"], ctx[f"cond_mask_{R}"])
            if plan.guided:
                z = model.decode(torch.cat([enc, enc]), torch.cat([keep, keep]), cond)
                pred_g = torch.cat([pred, pred])
            else:
                z = model.decode(enc, keep, cond)
                pred_g = pred
            Dd = z.shape[-1]
            z_pred = torch.gather(z, 1, pred_g[..., None].expand(-1, -1, Dd))  # (G·R, n, Dd)
        Fk = spec.fillings
        if Fk > 1:  # greedy: filling f of prompt b uses candidate f's noise
            z_pred = z_pred.repeat_interleave(Fk, 0)
            pred = pred.repeat_interleave(Fk, 0)
            tokens_RLC = tokens_RLC.repeat_interleave(Fk, 0)
            noise_rows_R = ctx["fill_rows"]
        RF = R * Fk
        noise_idx = ((noise_rows_R * L)[:, None] + pred).reshape(-1)
        noise_MJC = ctx["noise"].index_select(0, noise_idx)  # (RF·n, J, C)
        z_flat = z_pred.reshape(-1, Dd)
        x = self.head_sample(z_flat, noise_MJC, ctx["cfg"][spec.k], ctx["temperature"], plan.guided)
        tokens_RLC = tokens_RLC.scatter(1, pred[..., None].expand(-1, -1, C), x.view(RF, n, C).to(tokens_RLC.dtype))
        return tokens_RLC, noise_rows_R, sel

    # -- the fast decoder ------------------------------------------------------------------
    def _decode_fast(self, enc, keep, pred_Rn, ctx, guided: bool) -> torch.Tensor:
        """model.decode followed by the gather at this step's tokens, computed with the per-call
        text keys/values; -> z of the predicted tokens (G·R, n, Dd), rows [cond; uncond]."""
        model = self.model
        h = model.decoder_embed_ln(model.decoder_embed(enc))
        x = decoder_fill(h, keep, model.mask_token, model.dec_pos, model.seq_len)  # (R, S + L, Dd)
        blocks = model.decoder_blocks
        last = len(blocks) - 1
        R, Dd = x.shape[0], x.shape[-1]
        rows = model.buffer_size + pred_Rn  # decoder positions of the predicted tokens
        for i, blk in enumerate(blocks):
            if i == last:
                x = self._last_self_attention(blk, x, rows, guided)
            else:
                x = x + blk.attn(blk.norm1(x))
            if i == 0 and guided:
                # before the first cross-attention the cond and uncond rows are the same tokens
                x = torch.cat([x, x])
            x = x + self._cross(blk, i, blk.norm_x(x), ctx, R, guided)
            x = x + blk.mlp(blk.norm2(x))
        pos = model.diffusion_pos.index_select(0, pred_Rn.reshape(-1)).view(R, -1, Dd)
        if guided:
            pos = torch.cat([pos, pos])
        return model.decoder_norm(x) + pos

    @staticmethod
    def _last_self_attention(blk, x_GPD, rows_Rn, guided: bool) -> torch.Tensor:
        """Self-attention sub-layer of the last block with queries only at `rows` (keys and values
        from every position): its output at the other positions feeds nothing."""
        attn = blk.attn
        G, P, D = x_GPD.shape
        H = attn.heads
        if guided and G != rows_Rn.shape[0]:
            rows_Rn = torch.cat([rows_Rn, rows_Rn])
        n = rows_Rn.shape[1]
        y = blk.norm1(x_GPD)
        W, b = attn.qkv.weight, attn.qkv.bias
        k, v = F.linear(y, W[D:], b[D:]).view(G, P, 2, H, D // H).unbind(2)
        idx = rows_Rn[..., None].expand(-1, -1, D)
        x_sub = torch.gather(x_GPD, 1, idx)
        q = F.linear(torch.gather(y, 1, idx), W[:D], b[:D]).view(G, n, H, D // H)
        o = attention(q, k, v, None, attn.causal, 0.0, attn.backend)
        return x_sub + attn.proj(o.reshape(G, n, D))

    @staticmethod
    def _cross(blk, i: int, y_GnD, ctx, R: int, guided: bool) -> torch.Tensor:
        """blk.cross on rows [cond (R); uncond (R)] against the per-call keys/values: the R cond
        rows of one prompt (R/B candidates) form one query sequence against that prompt's keys,
        all uncond rows one sequence against the empty caption's."""
        ca = blk.cross
        G, n, D = y_GnD.shape
        H = ca.heads
        q = ca.q(y_GnD)
        backend = ca.backend
        if backend == "auto" and not q.is_cuda:
            backend = "explicit"  # scores are queries x T (short text): batched matmuls win on CPU
        kv_c = ctx["xkv_c"][i]
        B, T = kv_c.shape[:2]
        k, v = kv_c.view(B, T, 2, H, D // H).unbind(2)
        o = attention(q[:R].reshape(B, -1, H, D // H), k, v, ctx["xmask_c"], False, 0.0, backend)
        o = o.reshape(R, n, D)
        if guided:
            k, v = ctx["xkv_u"][i].view(1, T, 2, H, D // H).unbind(2)
            ou = attention(q[R:].reshape(1, -1, H, D // H), k, v, ctx["xmask_u"], False, 0.0, backend)
            o = torch.cat([o, ou.reshape(R, n, D)])
        return ca.proj(o)

    def final_select(self, plan: Plan, ctx, tokens):
        """Greedy SAD after the last step: score the K complete fillings, keep the best."""
        enc = self.model.encode(tokens.to(self.dtype), ctx["order_BK"])
        rows_B, sel = self._select(plan, ctx, enc, tokens)
        return tokens.index_select(0, rows_B), sel

    # -- the diffusion head ---------------------------------------------------------------
    def head_sample(
        self,
        z_GMZ: torch.Tensor,
        noise_MJC: torch.Tensor,
        cfg: torch.Tensor,
        temperature: torch.Tensor,
        guided: bool,
    ) -> torch.Tensor:
        """Respaced ancestral DDPM for M tokens -> x0 (M, C).

        z_GMZ: (G·M, Z) conditions, rows [cond; uncond] when guided (G = 2); both halves share x
        and the noise. noise_MJC[:, 0] is the initial x, noise_MJC[:, i + 1] step i's noise. The
        condition and timestep embeddings are computed once per call, not once per head step.
        """
        net = self.model.diffloss.net
        hdt = net.input_proj.weight.dtype
        tab = self._head_tables(z_GMZ.device, hdt)
        if self.fast and "ddpm" in tab and not use_triton(z_GMZ):
            loop = self._head_sample_cpu
            if self.compile == "step":
                loop = self._compiled("head_loop", loop)
            return loop(z_GMZ, noise_MJC, cfg, temperature, guided, tab)
        temb, table = tab["temb_SW"], tab["step_S7"]
        S = temb.shape[0]
        M = noise_MJC.shape[0]
        zemb = net.cond_embed(z_GMZ.to(hdt))
        x = noise_MJC[:, 0]
        for it in range(S):
            i = S - 1 - it
            y = zemb + temb[i]
            h = net.input_proj(x.to(hdt))
            if guided:
                h = torch.cat([h, h])  # the halves share x: project once
            for blk in net.blocks:
                h = blk(h, y)  # the fused adaln_block kernel on CUDA
            out = net.final_layer(h, y)
            out_u = out[M:] if guided else out
            x = guided_ddpm_step(out[:M], out_u, x, noise_MJC[:, it + 1], table[i], cfg, temperature)
        return x

    def _head_sample_cpu(self, z_GMZ, noise_MJC, cfg, temperature, guided: bool, tab: dict) -> torch.Tensor:
        """The same loop in fewer, larger CPU ops (CPU time here is per-op overhead): the
        modulations of every block and every timestep from one GEMM (in chunks of timesteps),
        addmm on pre-transposed weights, the DDPM step folded."""
        net = self.model.diffloss.net
        hdt = net.input_proj.weight.dtype
        W = net.width
        temb = tab["temb_SW"]
        S = temb.shape[0]
        zemb = net.cond_embed(z_GMZ.to(hdt))
        x = noise_MJC[:, 0]
        tnoise = noise_MJC * temperature  # τ scales only the injected noise
        mod_wT, mod_b = tab["mod_wT"], tab["mod_b"]
        step, coefs = self._head_step_cpu, tab["ddpm"]
        if self.compile == "block":
            step, coefs = self._compiled("head_step", step), tab["ddpm_t"]
        GM, NM = zemb.shape[0], mod_wT.shape[1]
        chunk = max(1, min(S, self.MOD_CHUNK_ELEMS // max(1, GM * NM)))
        mods_all = None
        for it in range(S):
            i = S - 1 - it
            if it % chunk == 0:  # timesteps i, i-1, ..., i-c+1 in one GEMM
                c = min(chunk, S - it)
                y = F.silu(zemb[None] + temb[i - c + 1 : i + 1].flip(0)[:, None])  # (c, GM, W)
                mods_all = torch.addmm(mod_b, y.view(c * GM, W), mod_wT).view(c, GM, NM)
            mods = mods_all[it % chunk]
            x = step(x, mods, tnoise[:, it + 1], cfg, coefs[i], guided, tab)
        return x

    @staticmethod
    def _head_step_cpu(x, mods, tnoise_MC, cfg, coefs: tuple, guided: bool, tab: dict) -> torch.Tensor:
        """One respaced DDPM step of the CPU head loop (the unit sample.compile='block' compiles)."""
        blocks = tab["blocks"]
        M, C = x.shape
        W = tab["in_wT"].shape[1]
        h = torch.addmm(tab["in_b"], x.to(tab["in_wT"].dtype), tab["in_wT"])
        if guided:
            h = torch.cat([h, h])
        for b, (ln_w, ln_b, eps, w1, b1, w2, b2) in enumerate(blocks):
            o = 3 * W * b
            a = torch.addcmul(mods[:, o : o + W], F.layer_norm(h, (W,), ln_w, ln_b, eps), mods[:, o + W : o + 2 * W])
            a = F.silu(torch.addmm(b1, a, w1), inplace=True)
            h = torch.addcmul(h, mods[:, o + 2 * W : o + 3 * W], torch.addmm(b2, a, w2))
        o = 3 * W * len(blocks)
        a = torch.addcmul(mods[:, o : o + W], F.layer_norm(h, (W,), None, None, tab["out_eps"]), mods[:, o + W :])
        out = torch.addmm(tab["out_b"], a, tab["out_wT"]).float()
        eps_c = out[:M, :C]
        eps = torch.lerp(out[M:, :C], eps_c, cfg) if guided else eps_c
        A, Be, va, vb, nonzero = coefs  # floats (eager) or 0-d tensors (compiled: no float guards)
        x_new = x * A - eps * Be
        if nonzero:  # host-static per respaced step, not data-dependent
            std = out[:M, C:].mul(va).add_(vb).exp_()
            x_new.addcmul_(std, tnoise_MC)
        return x_new

    def _compiled(self, name: str, fn):
        """fn under torch.compile (dynamic shapes, counted as sample.<name>), built once per sampler."""
        if name not in self._compiled_fns:
            from dream_fast.compile import compiled

            self._compiled_fns[name] = compiled(fn, f"sample.{name}")
        return self._compiled_fns[name]

    # -- outputs --------------------------------------------------------------------------
    @staticmethod
    def _result(plan: Plan, out: dict) -> SampleResult:
        res = SampleResult(out["tokens"])
        sels = out["selections"]
        if sels:
            res.scores_BK, res.chosen_B = sels[0]["scores"], sels[0]["chosen"]
            res.greedy_scores = [s["scores"] for s in sels[1:]]
            res.greedy_chosen = [s["chosen"] for s in sels[1:]]
        return res


def text_embedding(model: DREAM, ids_BT: torch.Tensor) -> torch.Tensor:
    """The prompts' contrastive embeddings (B, P) for SAD scoring (unnormalised)."""
    return model.text_features(ids_BT)[0]
