"""The DREAM model: masked ViT encoder, contrastive towers, text-conditioned decoder, DiffLoss head.

A plain nn.Module (no DeepSpeed, CUDA graphs or files). Every shape is static given the host-side
masked count: tokens are selected with precomputed per-sample orders, never boolean masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream_fast.config import LossConfig, ModelConfig
from dream_fast.kernels.decoder_fill import decoder_fill
from dream_fast.kernels.masked_gather import masked_gather
from dream_fast.model.blocks import LN_EPS, Block, CrossBlock, run_blocks
from dream_fast.model.contrastive import StableRepProjection, clip_loss
from dream_fast.model.diffloss import DiffLoss
from dream_fast.model.masking import split_order
from dream_fast.model.text import TextAligner, TextTower


@dataclass
class TextCond:
    """Decoder text conditioning after the aligner: keys/values (B, T, D_dec) and key mask (B, T)."""

    tokens: torch.Tensor
    mask: torch.Tensor


def _mlp_hidden(cfg: ModelConfig, width: int) -> int:
    return cfg.mlp_dim if cfg.mlp_dim else int(width * cfg.mlp_ratio)


class DREAM(nn.Module):
    """One model that is a CLIP-grade visual encoder and a text-to-image generator."""

    def __init__(self, cfg: ModelConfig, loss: LossConfig | None = None):
        super().__init__()
        self.cfg, self.loss_cfg = cfg, loss or LossConfig()
        C, L, S = cfg.token_dim, cfg.seq_len, cfg.buffer_size
        D, Dd = cfg.enc_width, cfg.dec_width
        be, gc = cfg.attn_backend, cfg.grad_checkpointing
        self.seq_len, self.buffer_size, self.token_dim, self.grad_ckpt = L, S, C, gc
        # Multi-rank runs set this (build_engine): a micro-batch below the diffusion threshold still runs
        # the decoder and head, on one sample at loss weight 0, so every rank builds the same autograd
        # graph and produces its gradients in the same order. ZeRO-2 (and overlapped ZeRO-1) fill their
        # reduce buckets in that order; ZeRO-3 gathers weights per module run. See decoder_graph_loss.
        self.same_graph_every_rank = False

        # ---- encoder (never sees text) ----
        self.z_proj = nn.Linear(C, D)
        self.buffer = nn.Parameter(torch.zeros(S, D))
        self.enc_pos = nn.Parameter(torch.zeros(S + L, D))
        self.z_proj_ln = nn.LayerNorm(D, eps=LN_EPS)
        self.encoder_blocks = nn.ModuleList(
            Block(D, cfg.enc_heads, _mlp_hidden(cfg, D), cfg.attn_dropout, cfg.proj_dropout, backend=be)
            for _ in range(cfg.enc_depth)
        )
        self.encoder_norm = nn.LayerNorm(D, eps=LN_EPS)

        # ---- contrastive side ----
        self.image_proj = StableRepProjection(D, cfg.proj_hidden, cfg.proj_dim)
        self.text_tower = TextTower(cfg.vocab_size, cfg.text_context, cfg.text_width, cfg.text_depth,
                                    cfg.text_heads, cfg.proj_dim, backend=be)
        self.logit_scale = nn.Parameter(torch.tensor(self.loss_cfg.logit_scale_init))

        # ---- decoder (text-conditioned) ----
        self.decoder_embed = nn.Linear(D, Dd)
        self.decoder_embed_ln = nn.LayerNorm(Dd, eps=LN_EPS)
        self.mask_token = nn.Parameter(torch.zeros(Dd))
        self.dec_pos = nn.Parameter(torch.zeros(S + L, Dd))
        self.text_aligner = TextAligner(cfg.text_cond_dim, cfg.text_cond_len, Dd, cfg.aligner_depth, cfg.dec_heads,
                                        _mlp_hidden(cfg, Dd), cfg.attn_dropout, cfg.proj_dropout, backend=be)
        self.decoder_blocks = nn.ModuleList(
            CrossBlock(Dd, cfg.dec_heads, _mlp_hidden(cfg, Dd), cfg.attn_dropout, cfg.proj_dropout, backend=be)
            for _ in range(cfg.dec_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=LN_EPS)
        self.diffusion_pos = nn.Parameter(torch.zeros(L, Dd))

        # ---- per-token diffusion head ----
        self.diffloss = DiffLoss(C, Dd, cfg.diffloss_w, cfg.diffloss_d, cfg.num_train_timesteps,
                                 cfg.num_sampling_steps, cfg.noise_schedule, cfg.diffusion_batch_mul,
                                 cfg.diffusion_weighting, cfg.diffusion_detail_weight, cfg.token_channels)

        # ---- text bookkeeping (set from the tokenizer / T5; saved with the weights) ----
        T, E = cfg.text_cond_len, cfg.text_cond_dim
        self.register_buffer("eot_id", torch.tensor(2, dtype=torch.long))
        empty = torch.zeros(1, cfg.text_context, dtype=torch.long)
        empty[0, 0], empty[0, 1] = 1, 2
        self.register_buffer("empty_ids", empty)
        self.register_buffer("empty_text_emb", torch.zeros(1, T, E))
        mask = torch.zeros(1, T, dtype=torch.bool)
        mask[0, 0] = True
        self.register_buffer("empty_text_mask", mask)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        for p in (self.buffer, self.enc_pos, self.mask_token, self.dec_pos, self.diffusion_pos):
            nn.init.normal_(p, std=0.02)
        if self.cfg.pos_init == "sincos":
            # Image positions start from a 2-D sin-cos grid (still learned): neighbouring tokens begin
            # with similar embeddings, so spatial relations need not be learned from scratch per token.
            S = self.buffer_size
            with torch.no_grad():
                self.enc_pos[S:] = sincos_2d(self.cfg.grid, self.enc_pos.shape[1])
                self.dec_pos[S:] = sincos_2d(self.cfg.grid, self.dec_pos.shape[1])
                self.diffusion_pos.copy_(sincos_2d(self.cfg.grid, self.diffusion_pos.shape[1]))
        skip = set(self.diffloss.modules())  # the head keeps its own (zero) init
        for m in self.modules():
            if m in skip:
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_text_specials(self, eot_id: int, empty_ids_T: torch.Tensor) -> None:
        """Tell the model its tokenizer's end-of-text id and the ids of the empty caption."""
        self.eot_id.fill_(int(eot_id))
        self.empty_ids.copy_(empty_ids_T.reshape(1, -1))

    def set_empty_text(self, emb_TE: torch.Tensor, mask_T: torch.Tensor) -> None:
        """The T5 (or precomputed) embedding of the empty caption, used for caption dropout / CFG."""
        self.empty_text_emb.copy_(emb_TE.reshape(self.empty_text_emb.shape))
        self.empty_text_mask.copy_(mask_T.reshape(self.empty_text_mask.shape))

    # ------------------------------------------------------------------------------------------
    # encoder and contrastive towers
    # ------------------------------------------------------------------------------------------
    def encode(self, tokens_BLC: torch.Tensor, keep_idx_BK: torch.Tensor) -> torch.Tensor:
        """Encoder on the buffer + visible tokens only -> (B, S + K, D)."""
        x = masked_gather(tokens_BLC, keep_idx_BK, self.z_proj.weight, self.z_proj.bias, self.enc_pos,
                          self.buffer, self.z_proj_ln.weight, self.z_proj_ln.bias, self.z_proj_ln.eps)
        x = run_blocks(self.encoder_blocks, x, grad_ckpt=self.grad_ckpt)
        return self.encoder_norm(x)

    def image_embedding(self, enc_BSKD: torch.Tensor) -> torch.Tensor:
        """Mean over ALL encoder outputs (buffer + visible) -> projection (unnormalised)."""
        return self.image_proj(enc_BSKD.mean(dim=1))

    def text_features(self, ids_BT: torch.Tensor):
        """Text tower -> (projected embedding (B, E), hidden (B, T, W), key mask (B, T)).

        hidden is what the decoder's aligner reads; with model.tower_cond_embed it also carries each
        token's LayerNorm'd word embedding, so no caption word can fade out of the decoder's view."""
        emb, hidden, mask = self.text_tower(ids_BT, self.eot_id, self.grad_ckpt)
        if self.cfg.tower_cond_embed:
            words = self.text_tower.token_embedding(ids_BT)
            hidden = hidden + F.layer_norm(words, words.shape[-1:])
        return emb, hidden, mask

    def encode_text_for_clip(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.text_features(ids_BT)[0]

    # ------------------------------------------------------------------------------------------
    # decoder
    # ------------------------------------------------------------------------------------------
    def text_condition(self, text_BTE: torch.Tensor, mask_BT: torch.Tensor,
                       drop_B: torch.Tensor | None = None) -> TextCond:
        """Aligner over text features; rows with drop_B set use the empty caption's features.

        text_cond "tower": the features are detached unless model.tower_cond_grad, so the tower plays
        T5's part -- a feature provider trained by the contrastive loss only, read by the trainable
        aligner. Letting the diffusion loss train the tower collapsed the shape-colour words on the
        tiny preset (their hidden states went from 6.0 apart to 0.4 in 300 steps) while the
        background word survived, and the decoder never learnt the shape's colour or position.
        """
        tower = self.cfg.text_cond == "tower"
        detach = tower and not self.cfg.tower_cond_grad
        if detach:
            text_BTE = text_BTE.detach()
        if drop_B is not None:
            if tower:
                _, empty, empty_mask = self.text_features(self.empty_ids)
                empty = empty.detach() if detach else empty
            else:
                empty, empty_mask = self.empty_text_emb, self.empty_text_mask
            text_BTE = torch.where(drop_B[:, None, None], empty.to(text_BTE.dtype), text_BTE)
            mask_BT = torch.where(drop_B[:, None], empty_mask, mask_BT)
        return TextCond(self.text_aligner(text_BTE, mask_BT, self.grad_ckpt), mask_BT)

    def null_condition(self, batch: int) -> TextCond:
        """The unconditional (empty-caption) condition for classifier-free guidance."""
        if self.cfg.text_cond == "tower":
            _, emb, mask = self.text_features(self.empty_ids)
        else:
            emb, mask = self.empty_text_emb, self.empty_text_mask
        cond = self.text_condition(emb, mask)
        return TextCond(cond.tokens.expand(batch, -1, -1), cond.mask.expand(batch, -1))

    def decode(self, enc_BSKD: torch.Tensor, keep_idx_BK: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """Decoder -> per-token diffusion conditions z (B, L, D_dec) (buffer dropped)."""
        h = self.decoder_embed_ln(self.decoder_embed(enc_BSKD))
        x = decoder_fill(h, keep_idx_BK, self.mask_token, self.dec_pos, self.seq_len)
        x = run_blocks(self.decoder_blocks, x, cond.tokens, cond.mask, grad_ckpt=self.grad_ckpt)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos

    # ------------------------------------------------------------------------------------------
    # training objective
    # ------------------------------------------------------------------------------------------
    def forward(self, tokens_BLC: torch.Tensor, ids_BT: torch.Tensor, n_masked: int, order_BL: torch.Tensor,
                text_emb_BTE: torch.Tensor | None = None, text_mask_BT: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """loss = w_diff * L_diff + w_clip * L_clip for one micro-batch with one mask ratio.

        n_masked: host-side masked count ceil(L r) (one r per micro-batch per rank).
        order_BL: per-sample random permutation; its first n_masked entries are masked.
        text_emb_BTE / text_mask_BT: T5 or precomputed features (text_cond t5/precomputed).
        """
        B, L, _ = tokens_BLC.shape
        lc, tower = self.loss_cfg, self.cfg.text_cond == "tower"
        masked_idx, keep_idx = split_order(order_BL, n_masked)
        enc = self.encode(tokens_BLC, keep_idx)
        zero = tokens_BLC.new_zeros(())
        idle: list[nn.Module | nn.Parameter] = []  # parts this micro-batch does not use

        use_clip = lc.clip_weight > 0
        use_diff = lc.diff_eligible(n_masked, L)
        run_decoder = use_diff or self.same_graph_every_rank
        if use_clip or (run_decoder and tower):
            txt_emb, txt_hidden, txt_mask = self.text_features(ids_BT)
        else:
            idle.append(self.text_tower)

        # contrastive: every sample of this micro-batch shares the visible fraction (L - m) / L
        if use_clip:
            visible_ok = lc.clip_eligible(n_masked, L)
            valid_B = torch.full((B,), visible_ok, dtype=torch.bool, device=tokens_BLC.device)
            loss_clip = clip_loss(self.image_embedding(enc), txt_emb, valid_B, self.logit_scale,
                                  lc.logit_scale_max)
        else:
            loss_clip = zero
            idle += [self.image_proj, self.logit_scale]
            if tower and run_decoder:  # the tower ran for the decoder only: no gradient reaches it when detached
                idle.append(self.text_tower.text_projection if self.cfg.tower_cond_grad else self.text_tower)

        # diffusion: only for micro-batches masked enough, and only on the masked tokens
        if run_decoder and tower:
            text_BTE, mask_BT = txt_hidden, txt_mask
        elif run_decoder:
            if text_emb_BTE is None or text_mask_BT is None:
                raise ValueError(f"model.text_cond={self.cfg.text_cond!r} needs text_emb_BTE and text_mask_BT")
            text_BTE, mask_BT = text_emb_BTE, text_mask_BT
        loss_diff = shadow = zero
        if use_diff:
            loss_diff = self.diffusion_loss(tokens_BLC, enc, keep_idx, masked_idx, text_BTE, mask_BT, generator)
        elif run_decoder:
            # weight-0 slice: the decoder and head on the first sample only (1/B of their cost), for
            # the same graph as the ranks above the threshold; its gradient is exactly zero
            sl_masked = masked_idx[:1] if n_masked > 0 else order_BL[:1, :1]  # >= 1 token for the head
            shadow = 0.0 * self.diffusion_loss(tokens_BLC[:1], enc[:1], keep_idx[:1], sl_masked,
                                               text_BTE[:1], mask_BT[:1], generator)
        else:
            idle += [self.decoder_embed, self.decoder_embed_ln, self.text_aligner, self.decoder_blocks,
                     self.decoder_norm, self.diffloss, self.mask_token, self.dec_pos, self.diffusion_pos]

        loss = lc.diff_weight * loss_diff + lc.clip_weight * loss_clip + shadow
        if idle:
            # Skipped parts still get an exact zero gradient -- what multiplying their loss by 0 would
            # give -- so AdamW state and ZeRO's gradient bookkeeping see every parameter every step.
            loss = loss + 0.0 * sum(p.sum() for p in _unique_params(idle))
        return {"loss": loss, "loss_diff": loss_diff.detach(), "loss_clip": loss_clip.detach()}

    def diffusion_loss(self, tokens_BLC: torch.Tensor, enc_BSKD: torch.Tensor, keep_idx_BK: torch.Tensor,
                       masked_idx_BM: torch.Tensor, text_BTE: torch.Tensor, mask_BT: torch.Tensor,
                       generator: torch.Generator | None) -> torch.Tensor:
        """L_diff of the masked tokens: decoder (with caption dropout) -> z -> per-token diffusion loss."""
        B = tokens_BLC.shape[0]
        drop = None
        if self.training and self.cfg.label_drop_prob > 0:
            gen = {} if generator is None else {"generator": generator}  # torch.compile-friendly
            u = torch.rand(B, device=tokens_BLC.device, **gen)
            drop = u < self.cfg.label_drop_prob
        cond = self.text_condition(text_BTE, mask_BT, drop)
        z = self.decode(enc_BSKD, keep_idx_BK, cond)
        Dd = z.shape[-1]
        z_m = torch.gather(z, 1, masked_idx_BM[..., None].expand(-1, -1, Dd))
        tgt = torch.gather(tokens_BLC, 1, masked_idx_BM[..., None].expand(-1, -1, self.token_dim))
        return self.diffloss(tgt.reshape(-1, self.token_dim), z_m.reshape(-1, Dd), generator=generator)["loss"]

    # ------------------------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on biases, 1-D params and the diffusion head (docs/design.md §1.8)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(".bias") or name.startswith("diffloss.") or name == "logit_scale":
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _unique_params(parts) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for part in parts:
        for p in ([part] if isinstance(part, nn.Parameter) else part.parameters()):
            seen.setdefault(id(p), p)
    return list(seen.values())


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sin-cos position table: half the channels encode the row, half the column,
    each as [sin | cos] over geometric frequencies; row-major like the tokens. The longest period is
    4 * grid (MAE uses 10000, which leaves most channels constant on a small grid: corner-to-corner
    cosine 0.73 at grid 8; here 0.28)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / float(4 * grid) ** (torch.arange(q, dtype=torch.float64) / q)
    coord = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coord, coord, indexing="ij")

    def enc(pos: torch.Tensor) -> torch.Tensor:
        a = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: ModelConfig, loss: LossConfig | None = None, device: str | torch.device | None = None) -> DREAM:
    """Build DREAM; device="meta" allocates nothing (parameter counting for B/L/H/G)."""
    if device is not None:
        with torch.device(device):
            return DREAM(cfg, loss)
    return DREAM(cfg, loss)


def flops_per_sample(cfg: ModelConfig, mask_ratio: float = 0.75, decoder: bool = True) -> float:
    """Approximate training FLOPs per image (fwd + bwd = 3x fwd matmul FLOPs), for MFU logging.

    Counts the matmuls of the encoder on visible tokens, the decoder on all L+S tokens with
    cross-attention to T text tokens, the aligner, the text tower and the head on masked tokens;
    decoder=False for micro-batches below the diffusion threshold (decoder, aligner, head skipped).
    """
    L, S = cfg.seq_len, cfg.buffer_size
    m = math.ceil(L * mask_ratio)
    D, Dd, W = cfg.enc_width, cfg.dec_width, cfg.diffloss_w
    T = cfg.text_cond_len

    def block(n: int, d: int, hidden: int, ctx: int | None = None) -> float:
        f = 2 * n * (4 * d * d + 2 * d * hidden) + 4 * n * n * d
        if ctx is not None:
            f += 2 * n * 2 * d * d + 2 * ctx * 2 * d * d + 4 * n * ctx * d
        return f

    enc = cfg.enc_depth * block(S + L - m, D, _mlp_hidden(cfg, D))
    dec = cfg.dec_depth * block(S + L, Dd, _mlp_hidden(cfg, Dd), ctx=T)
    ali = cfg.aligner_depth * block(T, Dd, _mlp_hidden(cfg, Dd))
    txt = cfg.text_depth * block(cfg.text_context, cfg.text_width, 4 * cfg.text_width)
    head = cfg.diffusion_batch_mul * m * 2 * (cfg.diffloss_d * 5 * W * W + Dd * W + W * 2 * cfg.token_dim)
    return 3.0 * (enc + txt + ((dec + ali + head) if decoder else 0.0))
