"""DreamPipeline: prompts in, PIL images + SAD scores + timings out, on top of DreamSampler.

Text conditions are computed once per batch (never per step); prompt i of a call uses seed + i,
so a prompt's image does not depend on the batch size or on the other prompts.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image

from dream_fast.config import DreamConfig
from dream_fast.data.bpe import BPETokenizer
from dream_fast.data.transforms import to_pil
from dream_fast.model.dream import DREAM
from dream_fast.sampling.inpaint import prepare_inpainting
from dream_fast.sampling.sampler import DreamSampler, draw_noise

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One image per prompt. scores[i]: the K candidates' text-image cosine at step T (None
    without SAD); chosen[i]: the kept candidate. timings in seconds (text, sample, decode, total)."""

    prompts: list[str]
    images: list[Image.Image]
    seeds: list[int]
    scores: list[list[float]] | None
    chosen: list[int] | None
    timings: dict[str, float]
    settings: dict = field(default_factory=dict)
    tokens: torch.Tensor | None = None  # (P, L, C) on the CPU


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt list is empty; give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings; entries {bad[:5]} are not")
    return prompts


class DreamPipeline:
    """Text-to-image (and inpainting) generation with a DREAM model."""

    def __init__(
        self,
        model: DREAM,
        cfg: DreamConfig,
        tokenizer: BPETokenizer | None,
        use_cuda_graphs: bool | None = None,
        t5=None,
    ):
        self.model = model.eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        graphs = cfg.sample.cuda_graphs if use_cuda_graphs is None else use_cuda_graphs
        self.sampler = DreamSampler(self.model, use_cuda_graphs=graphs, compile=cfg.sample.compile)
        self._t5 = t5
        self._image_tokenizer = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        use_cuda_graphs: bool | None = None,
    ) -> DreamPipeline:
        """Load an inference bundle (model.safetensors + config.yaml + tokenizer.json, as written by
        `dream-fast export` / `save_pretrained`). device defaults to CUDA when available."""
        from dream_fast.pretrained import load_pretrained

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pre = load_pretrained(path, device=device, dtype=dtype)
        return cls(pre.model, pre.cfg, pre.tokenizer, use_cuda_graphs=use_cuda_graphs)

    @property
    def device(self) -> torch.device:
        return self.sampler.device

    # -- parts ----------------------------------------------------------------------------
    @property
    def image_tokenizer(self):
        if self._image_tokenizer is None:
            from dream_fast.model.image_tokenizer import build_image_tokenizer

            self._image_tokenizer = build_image_tokenizer(self.cfg.model).to(self.device)
        return self._image_tokenizer

    def _t5_conditioner(self):
        if self._t5 is None:
            m = self.cfg.model
            if not m.t5_path:
                raise ValueError(
                    "model.text_cond is 't5' but model.t5_path is not set; set it to a local "
                    "T5EncoderModel directory or pass t5=T5Conditioner(...)"
                )
            from dream_fast.model.text import T5Conditioner

            self._t5 = T5Conditioner(m.t5_path, m.t5_len, device=self.device)
        return self._t5

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """BPE ids (P, context); prompts longer than the context are truncated with one warning."""
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer; SAD scoring and text_cond 'tower' need one")
        ctx_len = self.cfg.model.text_context
        ids, cut = self.tokenizer.encode(prompts, ctx_len, return_truncated=True)
        if bool(cut.any()):
            idx = cut.nonzero().reshape(-1).tolist()
            warnings.warn(
                f"{len(idx)} prompt(s) longer than the text context of {ctx_len} tokens were truncated "
                f"(prompt indices {idx[:10]}{'...' if len(idx) > 10 else ''})",
                UserWarning,
                stacklevel=3,
            )
        return ids

    @torch.no_grad()
    def text_inputs(
        self,
        prompts: list[str],
        ids_BT: torch.Tensor | None,
        text_emb: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ):
        """(decoder condition, contrastive text embedding or None) for one batch of prompts."""
        m, model, dev = self.cfg.model, self.model, self.device
        emb = hidden = mask = None
        if ids_BT is not None:
            emb, hidden, mask = model.text_features(ids_BT.to(dev))
        if m.text_cond == "t5":
            hidden, mask = self._t5_conditioner()(prompts)
        elif m.text_cond == "precomputed":
            if text_emb is None or text_mask is None:
                raise ValueError("model.text_cond is 'precomputed': pass text_emb (P, T, E) and text_mask (P, T)")
            hidden, mask = text_emb.to(dev), text_mask.to(dev).bool()
        dt = model.z_proj.weight.dtype
        return model.text_condition(hidden.to(dt), mask), emb

    # -- generation -----------------------------------------------------------------------
    def resolve(
        self,
        num_candidates=None,
        threshold=None,
        steps=None,
        cfg=None,
        cfg_schedule=None,
        temperature=None,
        greedy=None,
    ) -> dict:
        """Fill unset settings from cfg.sample and check them (errors name the bad value)."""
        s = self.cfg.sample
        N = s.num_iter if steps is None else int(steps)
        K = s.num_candidates if num_candidates is None else int(num_candidates)
        if N < 1:
            raise ValueError(f"steps must be >= 1, got {N}")
        if K < 1:
            raise ValueError(f"num_candidates must be >= 1, got {K}")
        if K > 1 and N < 2:
            raise ValueError(f"SAD with {K} candidates needs steps >= 2 (a threshold in [1, steps-1]), got steps={N}")
        if threshold is None:
            # keep the configured fraction of decoded steps (T/N) when steps change
            threshold = min(max(1, round(s.sad_threshold * N / s.num_iter)), N - 1) if K > 1 else None
        else:
            threshold = int(threshold)
            if not 1 <= threshold < N:
                raise ValueError(f"threshold must be in [1, steps-1={N - 1}] (steps={N}), got {threshold}")
        g = s.cfg if cfg is None else float(cfg)
        if g < 1.0:
            raise ValueError(f"cfg must be >= 1.0, got {g}")
        tau = s.temperature if temperature is None else float(temperature)
        if tau <= 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
        return dict(
            num_candidates=K,
            threshold=threshold if K > 1 else None,
            steps=N,
            cfg=g,
            cfg_schedule=s.cfg_schedule if cfg_schedule is None else cfg_schedule,
            temperature=tau,
            greedy=s.sad_greedy if greedy is None else bool(greedy),
        )

    def __call__(
        self,
        prompts: list[str] | str,
        num_candidates: int | None = None,
        threshold: int | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        seed: int = 0,
        batch_size: int = 8,
        greedy: bool | None = None,
        progress: bool = True,
        image=None,
        mask=None,
        text_emb: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        return_tokens: bool = False,
    ) -> GenerationResult:
        """Generate one image per prompt; with num_candidates K > 1, SAD keeps the best of K.

        image/mask: inpainting/outpainting (the same image and mask for every prompt; white mask
        pixels are generated). text_emb/text_mask: the prompts' text features when
        model.text_cond is 'precomputed'. Unset settings come from cfg.sample.
        """
        prompts = _check_prompts(prompts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        st = self.resolve(num_candidates, threshold, steps, cfg, cfg_schedule, temperature, greedy)
        if (image is None) != (mask is None):
            raise ValueError("inpainting needs both image= and mask= (white mask pixels are generated)")
        m, dev = self.cfg.model, self.device
        K, sad = st["num_candidates"], st["threshold"] is not None
        needs_ids = m.text_cond == "tower" or sad
        ids_all = self.tokenize(prompts) if needs_ids else None
        if text_emb is not None and text_emb.shape[0] != len(prompts):
            raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {len(prompts)} prompts")
        known, unknown_idx = None, None
        if image is not None:
            inp = prepare_inpainting(image, mask, m, self.image_tokenizer, dev)
            known, unknown_idx = inp.known_tokens_1LC, inp.unknown_idx_U
        S = self.model.diffloss.sample_diffusion.num_timesteps
        times = {"text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
        images, all_scores, all_chosen, all_tokens = [], [], [], []
        t_start = time.perf_counter()
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch")
        for b0 in starts:
            sl = slice(b0, b0 + batch_size)
            batch = prompts[sl]
            t0 = time.perf_counter()
            cond, emb = self.text_inputs(
                batch,
                None if ids_all is None else ids_all[sl],
                None if text_emb is None else text_emb[sl],
                None if text_mask is None else text_mask[sl],
            )
            self._sync()
            t1 = time.perf_counter()
            seeds = [seed + i for i in range(b0, b0 + len(batch))]
            noise = draw_noise(seeds, K, m.seq_len, m.token_dim, S, dev, unknown_idx)
            res = self.sampler.sample(
                cond,
                noise,
                st["steps"],
                st["cfg"],
                st["cfg_schedule"],
                st["temperature"],
                threshold=st["threshold"],
                greedy=st["greedy"],
                text_emb_BP=emb,
                known_tokens_BLC=known,
            )
            self._sync()
            t2 = time.perf_counter()
            with torch.no_grad():
                pix = self.image_tokenizer.decode(res.tokens_BLC.to(self.model.z_proj.weight.dtype))
            imgs = to_pil(pix.float().cpu())
            t3 = time.perf_counter()
            times["text_s"] += t1 - t0
            times["sample_s"] += t2 - t1
            times["decode_s"] += t3 - t2
            images += imgs
            if return_tokens:
                all_tokens.append(res.tokens_BLC.float().cpu())
            if res.scores_BK is not None:
                all_scores += res.scores_BK.float().cpu().tolist()
                all_chosen += res.chosen_B.cpu().tolist()
        times["total_s"] = time.perf_counter() - t_start
        times["per_image_s"] = times["total_s"] / len(prompts)
        return GenerationResult(
            prompts=prompts,
            images=images,
            seeds=[seed + i for i in range(len(prompts))],
            scores=all_scores if sad else None,
            chosen=all_chosen if sad else None,
            timings=times,
            settings={**st, "seed": seed, "batch_size": batch_size, "inpainting": image is not None},
            tokens=torch.cat(all_tokens) if return_tokens else None,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # timing boundary between phases, outside any step
