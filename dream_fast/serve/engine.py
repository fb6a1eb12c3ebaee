"""The model side of `dream-fast serve`: a bounded queue of jobs, coalesced by settings into one
sampler call on a single model thread (off the event loop), results handed back to asyncio futures.

A prompt's image depends only on (prompt, seed, settings), never on its batch (docs/design.md §1.9:
all randomness is drawn per prompt from its seed before sampling), so coalescing is invisible to
clients. Jobs whose client left (or whose deadline passed) before their batch starts are dropped.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dream_fast.data.transforms import to_pil, to_tensor
from dream_fast.sampling.pipeline import DreamPipeline
from dream_fast.sampling.sampler import draw_noise
from dream_fast.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds --max-queue jobs; the client should retry after `retry_after_s`."""

    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"the queue is full ({depth} jobs waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotAccepting(RuntimeError):
    """The engine is warming up or shutting down."""


@dataclass(frozen=True)
class GenSettings:
    """Resolved sampling settings; jobs with equal settings share one sampler call."""

    num_candidates: int
    threshold: int | None
    steps: int
    cfg: float
    cfg_schedule: str
    temperature: float
    greedy: bool


@dataclass(eq=False)  # identity: a job is in the queue or not
class Job:
    """One request's work. kind "generate": payload (prompts, seeds); kind "embed": payload
    {"texts", "images" (PIL), "labels"}. `size` counts prompts/items against --max-batch."""

    kind: str
    key: Any
    payload: Any
    size: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    t_enqueue: float = field(default_factory=time.perf_counter)
    t_start: float | None = None
    cancelled: str | None = None  # reason, set from the event loop ("disconnect", "timeout")


def _resolve(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- model calls


class Runner:
    """Batched model calls on one DreamPipeline: generation with per-prompt seeds, embeddings.

    fixed_batch: pad every model call to this many rows (copies of the first prompt or item,
    outputs discarded). A GEMM's rounding can depend on its row count (BLAS picks kernels and
    thread splits by shape: on this CPU a lone prompt's tokens differed from its batched ones by
    up to 2e-4 at 2 threads), so only one shape per settings makes a prompt's image and SAD scores
    bit-identical under any load and on any device; it also means one CUDA graph per settings.
    """

    def __init__(self, pipe: DreamPipeline, fixed_batch: int | None = None):
        if fixed_batch is not None and fixed_batch < 1:
            raise ValueError(f"fixed_batch must be >= 1 or None, got {fixed_batch}")
        self.fixed_batch = fixed_batch
        self.pipe = pipe
        self.model = pipe.model
        m = pipe.cfg.model
        self.img_size, self.seq_len, self.token_dim = m.img_size, m.seq_len, m.token_dim

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], st: GenSettings) -> dict:
        """Images (PNG bytes) + SAD scores/chosen + timings for prompts sampled with their own seeds
        (prompt i's image equals `pipe([prompt_i], seed=seeds[i])`'s up to float rounding; exactly
        under fixed_batch)."""
        n = len(prompts)
        if self.fixed_batch is not None and n < self.fixed_batch:
            pad = self.fixed_batch - n
            prompts, seeds = prompts + [prompts[0]] * pad, seeds + list(range(pad))
        pipe, dev = self.pipe, self.pipe.device
        K, sad = st.num_candidates, st.threshold is not None
        needs_ids = pipe.cfg.model.text_cond == "tower" or sad
        S = self.model.diffloss.sample_diffusion.num_timesteps
        t0 = time.perf_counter()
        ids = pipe.tokenize(prompts) if needs_ids else None
        cond, emb = pipe.text_inputs(prompts, ids)
        pipe._sync()
        t1 = time.perf_counter()
        noise = draw_noise(seeds, K, self.seq_len, self.token_dim, S, dev)
        res = pipe.sampler.sample(
            cond,
            noise,
            st.steps,
            st.cfg,
            st.cfg_schedule,
            st.temperature,
            threshold=st.threshold,
            greedy=st.greedy,
            text_emb_BP=emb,
        )
        pipe._sync()
        t2 = time.perf_counter()
        pix = pipe.image_tokenizer.decode(res.tokens_BLC.to(self.model.z_proj.weight.dtype))
        pngs = [png_bytes(im) for im in to_pil(pix[:n].float().cpu())]
        t3 = time.perf_counter()
        scores = res.scores_BK[:n].float().cpu().tolist() if sad else None
        chosen = res.chosen_B[:n].cpu().tolist() if sad else None
        return {
            "pngs": pngs,
            "scores": scores,
            "chosen": chosen,
            "timings": {"text_s": t1 - t0, "sample_s": t2 - t1, "decode_s": t3 - t2},
        }

    def _chunks(self, items: list, fn) -> torch.Tensor:
        """fn over items in chunks of fixed_batch rows (the last one padded), or all at once."""
        if self.fixed_batch is None:
            return fn(items)
        out = []
        for i in range(0, len(items), self.fixed_batch):
            chunk = items[i : i + self.fixed_batch]
            out.append(fn(chunk + [chunk[0]] * (self.fixed_batch - len(chunk)))[: len(chunk)])
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(N, E) L2-normalised contrastive text embeddings."""

        def fn(chunk):
            ids = self.pipe.tokenize(chunk).to(self.pipe.device)
            return F.normalize(self.model.text_features(ids)[0].float(), dim=-1)

        return self._chunks(texts, fn)

    @torch.no_grad()
    def image_embeddings(self, images: list) -> torch.Tensor:
        """(N, E) L2-normalised image embeddings of img_size x img_size PIL images (all tokens visible)."""

        def fn(chunk):
            x = torch.stack([to_tensor(im) for im in chunk]).to(self.pipe.device)
            tokens = self.pipe.image_tokenizer.encode(x).to(self.model.z_proj.weight.dtype)
            B, L = tokens.shape[:2]
            keep = torch.arange(L, device=tokens.device).expand(B, L).contiguous()
            enc = self.model.encode(tokens, keep)
            return F.normalize(self.model.image_embedding(enc).float(), dim=-1)

        return self._chunks(images, fn)

    def logit_scale(self) -> float:
        s = self.model.logit_scale.detach().float().clamp(max=self.pipe.cfg.loss.logit_scale_max)
        return float(s.exp())

    @torch.no_grad()
    def embed(self, texts: list[str], images: list, labels: list[str] | None) -> dict:
        """Embeddings of texts and images; with labels, each item's softmax over the labels'
        cosines (times the model's learned logit scale, as in training: docs/design.md §1.3)."""
        t0 = time.perf_counter()
        txt = self.text_embeddings(texts) if texts else None
        img = self.image_embeddings(images) if images else None
        probs_txt = probs_img = None
        if labels:
            lab = self.text_embeddings(labels)
            scale = self.logit_scale()
            if txt is not None:
                probs_txt = (scale * txt @ lab.T).softmax(-1).tolist()
            if img is not None:
                probs_img = (scale * img @ lab.T).softmax(-1).tolist()
        return {
            "text": None if txt is None else txt.cpu().tolist(),
            "image": None if img is None else img.cpu().tolist(),
            "text_label_probs": probs_txt,
            "image_label_probs": probs_img,
            "timings": {"embed_s": time.perf_counter() - t0},
        }


# ----------------------------------------------------------------------------- engine


class Engine:
    """Bounded job queue + one model thread that coalesces compatible jobs.

    A batch starts with the oldest job and takes every later job of the same kind and settings
    while the batch holds at most max_batch prompts (a lone job larger than that runs in chunks);
    it waits up to max_wait_ms after the oldest job arrived for more to join.
    """

    def __init__(
        self,
        runner: Runner,
        metrics: ServeMetrics | None = None,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        warmup: GenSettings | None = None,
        warmup_batches: tuple[int, ...] = (),
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.runner = runner
        self.metrics = metrics or ServeMetrics()
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._warmup, self._warmup_batches = warmup, warmup_batches
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.batch_seconds_ewma = 1.0  # for Retry-After
        self.error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="dream-serve-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued job, then end the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self._warm()
        except Exception as e:  # the server stays up and says why it is not ready
            log.exception("warm-up failed")
            self.error = f"warm-up failed: {type(e).__name__}: {e}"
            return
        self.ready.set()
        self.metrics.ready.set(1)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _warm(self) -> None:
        """One sampler call per warm-up batch size (captures CUDA graphs for those shapes)."""
        if self._warmup is None:
            return
        for b in self._warmup_batches:
            t0 = time.perf_counter()
            self.runner.generate(["warm-up"] * b, list(range(b)), self._warmup)
            log.info("warm-up batch of %d: %.2f s", b, time.perf_counter() - t0)

    # -- queue ----------------------------------------------------------------------------
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull past max_queue, NotAccepting before ready / when stopping."""
        with self._cond:
            if self._stopping:
                raise NotAccepting("the server is shutting down")
            if not self.ready.is_set():
                raise NotAccepting(self.error or "the model is still warming up")
            if len(self._queue) >= self.max_queue:
                self.metrics.rejected.inc()
                # the queue drains about max_batch prompts per batch time
                batches = max(1, len(self._queue) // self.max_batch)
                raise QueueFull(len(self._queue), max(1, round(batches * self.batch_seconds_ewma + 0.5)))
            self._queue.append(job)
            self._update_gauges()
            self._cond.notify_all()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.queue_items.set(sum(j.size for j in self._queue))

    def cancel(self, job: Job, reason: str) -> bool:
        """The client left or its deadline passed: drop the job if its batch has not started
        (returns True), else let the batch finish and discard the result (False)."""
        job.future.cancel()
        with self._cond:
            job.cancelled = reason
            if job.t_start is not None or job not in self._queue:
                return False
            self._queue.remove(job)
            self.metrics.dropped.inc(reason=reason)
            self._update_gauges()
            self._cond.notify_all()
            return True

    def _compatible(self, first: Job) -> tuple[list[Job], int]:
        batch, n = [first], first.size
        for j in self._queue:
            if j is first or j.kind != first.kind or j.key != first.key:
                continue
            if n + j.size <= self.max_batch:
                batch.append(j)
                n += j.size
        return batch, n

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                first = self._queue[0]
                batch, n = self._compatible(first)
                wait = first.t_enqueue + self.max_wait_s - time.perf_counter()
                if n >= self.max_batch or wait <= 0 or self._stopping:
                    break
                self._cond.wait(wait)  # more jobs may join (or the first may be cancelled)
            ids = {id(j) for j in batch}
            self._queue = deque(j for j in self._queue if id(j) not in ids)
            self._update_gauges()
        now = time.perf_counter()
        for j in batch:
            j.t_start = now
            self.metrics.queue_wait.observe(now - j.t_enqueue)
        return batch

    # -- execution ------------------------------------------------------------------------
    def _run(self, batch: list[Job]) -> None:
        kind = batch[0].kind
        t0 = time.perf_counter()
        try:
            results = self._generate(batch) if kind == "generate" else self._embed(batch)
            errors = [None] * len(batch)
        except Exception as e:  # an internal error fails this batch only; the thread lives on
            log.exception("%s batch of %d jobs failed", kind, len(batch))
            results, errors = [None] * len(batch), [e] * len(batch)
        dt = time.perf_counter() - t0
        self.batch_seconds_ewma = 0.8 * self.batch_seconds_ewma + 0.2 * dt
        self.metrics.batch_prompts.observe(sum(j.size for j in batch), kind=kind)
        self.metrics.batch_seconds.observe(dt, kind=kind)
        for j, r, e in zip(batch, results, errors):
            j.loop.call_soon_threadsafe(_resolve, j.future, r, e)

    def _generate(self, batch: list[Job]) -> list[dict]:
        st: GenSettings = batch[0].key
        prompts = [p for j in batch for p in j.payload[0]]
        seeds = [s for j in batch for s in j.payload[1]]
        out = {"pngs": [], "scores": [], "chosen": []}
        timings = {"text_s": 0.0, "sample_s": 0.0, "decode_s": 0.0}
        for b0 in range(0, len(prompts), self.max_batch):  # a lone job larger than max_batch
            sl = slice(b0, b0 + self.max_batch)
            r = self.runner.generate(prompts[sl], seeds[sl], st)
            out["pngs"] += r["pngs"]
            out["scores"] += r["scores"] or []
            out["chosen"] += r["chosen"] or []
            for k, v in r["timings"].items():
                timings[k] += v
        self.metrics.images.inc(len(prompts))
        self.metrics.image_rate.add(len(prompts))
        results, i = [], 0
        for j in batch:
            n = j.size
            results.append(
                {
                    "pngs": out["pngs"][i : i + n],
                    "scores": out["scores"][i : i + n] if st.threshold is not None else None,
                    "chosen": out["chosen"][i : i + n] if st.threshold is not None else None,
                    "timings": {"queue_s": j.t_start - j.t_enqueue, **timings, "batch_prompts": len(prompts)},
                }
            )
            i += n
        return results

    def _embed(self, batch: list[Job]) -> list[dict]:
        # one call per distinct label set; texts and images of all jobs together
        texts = [t for j in batch for t in j.payload["texts"]]
        images = [im for j in batch for im in j.payload["images"]]
        labels = batch[0].payload["labels"]  # the key holds the label set: equal within a batch
        r = self.runner.embed(texts, images, labels)
        results, ti, ii = [], 0, 0
        for j in batch:
            nt, ni = len(j.payload["texts"]), len(j.payload["images"])
            results.append(
                {
                    "text": None if r["text"] is None else r["text"][ti : ti + nt],
                    "image": None if r["image"] is None else r["image"][ii : ii + ni],
                    "text_label_probs": None if r["text_label_probs"] is None else r["text_label_probs"][ti : ti + nt],
                    "image_label_probs": None
                    if r["image_label_probs"] is None
                    else r["image_label_probs"][ii : ii + ni],
                    "timings": {
                        "queue_s": j.t_start - j.t_enqueue,
                        **r["timings"],
                        "batch_items": len(texts) + len(images),
                    },
                }
            )
            ti, ii = ti + nt, ii + ni
        return results
