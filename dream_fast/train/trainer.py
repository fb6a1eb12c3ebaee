"""The training loop: one code path for one CPU process, one GPU, or many ranks and nodes.

`train(cfg)` sets up the process group (a 1-rank gloo/NCCL group when no launcher is present),
data, model, engine, EMA and metrics; steps until max_steps / epochs / max_minutes / a signal;
checkpoints atomically; returns a TrainResult. Masking Warmup reads the fractional epoch
samples_seen_global / epoch_size every micro-batch; each rank draws its own mask ratio.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dream_fast.config import ConfigError, DreamConfig
from dream_fast.dist import (
    STOP_SIGNALS,
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    check_timeout,
    init_distributed,
    lock_run_dir,
    setup_environment,
    teardown,
)
from dream_fast.model.dream import build_model, count_params, flops_per_sample
from dream_fast.model.masking import mask_mu, num_masked, random_orders, sample_mask_ratio
from dream_fast.train import checkpoint as ckpt_io
from dream_fast.train.ema import EMA
from dream_fast.train.engine import build_engine, canonical_state, deepspeed_config, engine_kind, resolve_precision
from dream_fast.train.inputs import InputMaker, ModelInputs, dummy_inputs
from dream_fast.train.metrics import MetricsLogger, format_line, peak_memory_mb, peak_tflops
from dream_fast.train.optim import make_schedule

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int  # optimizer steps done in total (including earlier runs when resumed)
    epochs: float  # fractional epochs of data seen
    final_metrics: dict[str, Any]  # the last logged record
    checkpoint: Path | None  # the newest checkpoint directory
    metrics_path: Path
    stopped_by: str  # "max_steps" | "epochs" | "max_minutes" | "signal" | "callback"
    skipped_samples: int = 0
    skipped_shards: int = 0
    bad_steps: int = 0
    resumed_from: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive non-finite losses (train.max_bad_steps)."""


def check_config(cfg: DreamConfig, world_size: int) -> None:
    """Everything that can be wrong with the config, before any data or model work."""
    from dream_fast.data.setup import check_data_config

    cfg.validate()
    t = cfg.train
    try:
        check_timeout(t.dist_timeout_s)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if engine_kind(cfg, world_size) == "deepspeed":
        deepspeed_config(cfg, world_size)
    if t.max_steps is not None and t.max_steps < 0:
        raise ConfigError(f"train.max_steps must be >= 0, got {t.max_steps}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise ConfigError(f"train.max_minutes must be > 0, got {t.max_minutes}")
    if t.log_every < 1 or t.ckpt_every < 1:
        raise ConfigError("train.log_every and train.ckpt_every must be >= 1")
    if t.epochs <= 0 and t.max_steps is None:
        raise ConfigError(f"train.epochs must be > 0 (or set train.max_steps), got {t.epochs}")
    if t.zero_stage == 3 and cfg.loss.clip_weight == 0:
        raise ConfigError("train.zero_stage=3 needs loss.clip_weight > 0: with the contrastive loss off, the "
                          "text tower and image projection never run and ZeRO-3 cannot give them their "
                          "zero gradients; use train.zero_stage=2 for FLUID-style runs")
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision='fp16' needs CUDA; use fp32 (default on CPU) or bf16")
    check_data_config(cfg, world_size)


def train(cfg: DreamConfig, progress: bool = True, resume: str | None = None,
          on_step: Callable[[dict[str, Any]], bool | None] | None = None) -> TrainResult:
    """Train `cfg` in this process (alone, or as one rank under the deepspeed launcher/torchrun).

    resume: "auto" (latest checkpoint in train.out_dir, fresh start when none), a checkpoint or
    run directory, or None (train.resume decides).
    on_step: called after every optimizer step with {"step", "total_steps", "loss", "samples_seen",
    "epoch", "elapsed_s"}; returning True stops the run there (checkpointed, stopped_by "callback")."""
    import os

    setup_environment()  # SLURM task variables -> RANK/WORLD_SIZE before the engine is chosen
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_config(cfg, world)
    info = init_distributed(use_deepspeed=engine_kind(cfg, world) == "deepspeed", timeout_s=cfg.train.dist_timeout_s)
    lock = None
    try:
        lock = lock_run_dir(Path(cfg.train.out_dir), info)  # one training process per run directory
        cfg.train.precision = resolve_precision(cfg, info.device, world)
        trainer = Trainer(cfg, info, progress, resume if resume is not None else cfg.train.resume)
        trainer.on_step = on_step
        return trainer.run()
    finally:
        if lock is not None:
            lock.release()
        teardown(info)


class _StopFlag:
    """SIGTERM/SIGUSR1/SIGINT set a flag; the loop finishes its step, checkpoints and returns
    (SIGUSR1: what SLURM's `--signal=USR1@120` sends before the time limit)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (*STOP_SIGNALS, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        log.warning("received %s: finishing this step, then checkpointing", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class StepRunner:
    """One micro-batch forward/backward and the per-optimizer-step updates, shared by the trainer and
    the multi-rank parity tests."""

    def __init__(self, cfg: DreamConfig, engine: Any, ema: EMA, info: DistInfo, gen: torch.Generator):
        self.cfg, self.engine, self.ema, self.info, self.gen = cfg, engine, ema, info, gen

    def micro_step(self, inputs: ModelInputs, n_masked: int, order_BL: torch.Tensor) -> dict[str, float] | None:
        """Forward + backward of one micro-batch; None when its loss was non-finite on any rank
        (then nothing is applied: no backward, no optimizer update)."""
        out = self.engine.forward(inputs.tokens_BLC, inputs.ids_BT, n_masked, order_BL,
                                  text_emb_BTE=inputs.text_emb_BTE, text_mask_BT=inputs.text_mask_BT,
                                  generator=self.gen)
        loss = out["loss"]
        vals = torch.stack([loss.detach().float(), out["loss_diff"].float(), out["loss_clip"].float()]).tolist()
        bad = all_reduce_max(0.0 if math.isfinite(vals[0]) else 1.0, self.info.device) > 0
        if bad:
            return None
        self.engine.backward(loss)
        self.engine.step()
        lc = self.cfg.loss
        diff_counts = lc.diff_eligible(n_masked, order_BL.shape[1])
        clip_counts = lc.clip_weight > 0 and lc.clip_eligible(n_masked, order_BL.shape[1])
        return {"loss": vals[0], "loss_diff": vals[1] if diff_counts else 0.0, "loss_clip": vals[2],
                "n_diff": float(diff_counts), "n_clip": float(clip_counts)}

    def post_step(self) -> None:
        self.engine.clamp_param_("logit_scale", self.cfg.loss.logit_scale_max)
        self.ema.update()



class Trainer:
    def __init__(self, cfg: DreamConfig, info: DistInfo, progress: bool, resume: str | None):
        self.cfg, self.info, self.progress = cfg, info, progress
        self.out_dir = Path(cfg.train.out_dir)
        self.resume_arg = resume
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "config.yaml")
        from dream_fast.dist import barrier

        barrier()

        # ---- data (before the model: the tokenizer decides the text specials) ----
        from dream_fast.data.setup import build_train_data

        self.data = build_train_data(cfg, self.out_dir, info)
        self.global_batch = t.batch_size * t.grad_accum * info.world_size
        self.epoch_size = self.data.epoch_size
        self.steps_per_epoch = self.epoch_size / self.global_batch
        # The run's length is planned in samples (all ranks): max_steps counts steps at the global batch
        # the run started with (kept in its checkpoints), epochs count passes over the data. The lr
        # schedule, Masking Warmup and the stop all read samples_seen, so a run resumed on another
        # number of GPUs keeps its schedule.
        self.plan_global_batch = self.global_batch
        self.total_samples = self._planned_samples()
        self.schedule = make_schedule(cfg.optim, self.global_batch, self.epoch_size, self.total_samples)

        # ---- model: identical initial weights on every rank ----
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, cfg.loss)
        tok = self.data.tokenizer
        model.set_text_specials(tok.eot_id, tok.encode([""], cfg.model.text_context)[0])
        if self.data.empty_text is not None:
            model.set_empty_text(*self.data.empty_text)
        self.num_params = count_params(model)
        dry = dummy_inputs(cfg, 2, info.device) if t.zero_stage == 3 else None
        self.engine = build_engine(model, cfg, info, self.out_dir, dry_run_inputs=dry)
        self.model = self.engine.module
        self.ema = EMA(*self.engine.ema_shards(), decay=cfg.optim.ema_decay)
        self.maker = InputMaker(cfg, info.device, self.engine.input_dtype())

        # ---- per-rank randomness: mask ratios, orders, diffusion noise, caption dropout ----
        self.np_rng = np.random.default_rng([t.seed, info.rank])
        self.gen = torch.Generator(device=info.device).manual_seed(t.seed * 1_000_003 + 7919 * info.rank + 1)
        torch.manual_seed(t.seed * 1_000_003 + info.rank)  # dropout
        self.runner = StepRunner(cfg, self.engine, self.ema, info, self.gen)

        # ---- counters ----
        self.step = 0
        self.samples_seen = 0  # global (all ranks)
        self.total_steps = self._steps_to_go()
        self.elapsed_s = 0.0  # training wall time over all runs of this out_dir
        self.bad_total = 0
        self.bad_run = 0
        self.resumed_from: Path | None = None
        self.metrics = MetricsLogger(self.out_dir, info.is_main)
        self.peak, self.peak_src = peak_tflops(info.device, cfg.train.precision)
        self.history: list[dict[str, Any]] = []
        self.last_ckpt: Path | None = None
        self.on_step: Callable[[dict[str, Any]], bool | None] | None = None

    # ------------------------------------------------------------------------------------------
    def _planned_samples(self) -> int:
        t = self.cfg.train
        if t.max_steps is not None:
            return t.max_steps * self.plan_global_batch
        return math.ceil(t.epochs * self.epoch_size)

    def _steps_to_go(self) -> int:
        """Optimizer steps done + those left at this run's global batch (the progress bar's total)."""
        return self.step + max(0, math.ceil((self.total_samples - self.samples_seen) / self.global_batch))

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen, "elapsed_s": self.elapsed_s,
                "plan_global_batch": self.plan_global_batch, "global_batch": self.global_batch,
                "bad_steps_total": self.bad_total, "epoch": self.samples_seen / self.epoch_size,
                "engine": self.engine.kind, "zero_stage": self.cfg.train.zero_stage,
                "config": self.cfg.to_dict(), "num_params": self.num_params}  # fmt: skip

    def _ema_state(self) -> dict[str, torch.Tensor]:
        """EMA parameters + current buffers, in the model's own parameter shapes (collective)."""
        full = self.ema.full()
        state = {k: v for k, v in full.items()}
        for name, buf in self.model.named_buffers():
            state[name] = buf.detach().cpu().clone()
        return canonical_state(state, self.engine.param_shapes)

    def save(self) -> Path:
        ema_state = self._ema_state()
        portable = self.engine.portable_state() if self.cfg.train.elastic_ckpt else None  # collective
        path = ckpt_io.save_checkpoint(
            self.out_dir, self.step, self.engine, ema_state if self.info.is_main else None,
            self._trainer_state(), ckpt_io.rng_state(self.np_rng, self.gen), self.data.stream.state(),
            self.info, self.cfg.train.keep_ckpts, self.data.tokenizer_path, portable)
        self.last_ckpt = path
        return path

    def load(self, ckpt: Path) -> None:
        state = ckpt_io.read_state(ckpt)
        written = (state.get("engine"), state.get("world_size"), state.get("zero_stage"))
        now = (self.engine.kind, self.info.world_size, self.cfg.train.zero_stage)
        if written == now:
            self.engine.load(ckpt)  # the engine's own files: exact, sharded as they were written
        elif (ckpt / ckpt_io.PORTABLE).is_file():
            log.warning("resuming a %s checkpoint from %s rank(s) (ZeRO %s) with %s on %d rank(s) (ZeRO %d): "
                        "weights and Adam moments from %s", written[0], written[1], written[2], now[0], now[1],
                        now[2], ckpt_io.PORTABLE)
            self.engine.load_portable(load_file(str(ckpt / ckpt_io.PORTABLE)), adam_steps=int(state["step"]))
        else:
            raise ConfigError(f"{ckpt} was written by the {written[0]} engine on {written[1]} rank(s) with ZeRO "
                              f"{written[2]}; this run is {now[0]} on {now[1]} rank(s) with ZeRO {now[2]}, and the "
                              f"checkpoint has no {ckpt_io.PORTABLE} (train.elastic_ckpt was off): resume it "
                              f"with the same engine, world size and ZeRO stage")
        ema = ckpt_io.load_ema(ckpt)
        self.ema.load_full({k: v.reshape(-1) if k in self.engine.param_shapes else v for k, v in ema.items()})
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.plan_global_batch = int(state.get("plan_global_batch", self.global_batch))
        self.total_samples = self._planned_samples()
        self.total_steps = self._steps_to_go()
        if state.get("global_batch", self.global_batch) != self.global_batch:
            log.warning("resuming a run trained at global batch %s with global batch %d: the schedule follows "
                        "samples seen (%d of %d); lr %.2e by the scaling rule at this batch", state.get("global_batch"),
                        self.global_batch, self.samples_seen, self.total_samples, self.schedule.base_lr)
        self.elapsed_s, self.bad_total = float(state.get("elapsed_s", 0.0)), int(state.get("bad_steps_total", 0))
        rng, data_pos = ckpt_io.load_rank_files(ckpt, self.info.rank)
        if rng is not None:
            ckpt_io.restore_rng(rng, self.np_rng, self.gen)
        if data_pos is not None and state.get("world_size") == self.info.world_size:
            self.data.stream.load_state(data_pos)
        else:
            log.warning("resuming with %d ranks from a %s-rank checkpoint: data order restarts at epoch %d",
                        self.info.world_size, state.get("world_size"), self.samples_seen // self.epoch_size)
            self.data.stream.load_state({"epoch": self.samples_seen // self.epoch_size, "batch": 0})
        self.resumed_from = ckpt
        self.metrics.truncate_after(self.step)
        self.last_ckpt = ckpt

    # ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, info, t = self.cfg, self.info, self.cfg.train
        ckpt = ckpt_io.find_resume(self.out_dir, self.resume_arg)
        if self.resume_arg and self.resume_arg != "auto" and ckpt is None:
            raise FileNotFoundError(f"train.resume={self.resume_arg!r}: no checkpoint there")
        if ckpt is not None:
            self.load(ckpt)
            if info.is_main:
                log.info("resumed from %s at step %d", ckpt, self.step)
        if info.is_main:
            log.info("DREAM %s: %.2fM parameters, engine %s (ZeRO %d), %d rank(s), global batch %d, "
                     "%d steps (%.1f per epoch), lr %.2e, peak %.2f TFLOP/s/device (%s)",
                     cfg.name, self.num_params / 1e6, self.engine.kind, t.zero_stage, info.world_size,
                     self.global_batch, self.total_steps, self.steps_per_epoch, self.schedule.base_lr,
                     self.peak, self.peak_src)  # fmt: skip
        L, B = cfg.model.seq_len, t.batch_size
        budget_s = t.max_minutes * 60.0 if t.max_minutes else None
        stopped_by = "max_steps" if t.max_steps is not None else "epochs"
        pbar = None
        if self.progress and info.is_main:
            from tqdm.auto import tqdm

            # redraw at most every 30 s when stderr is a file or pipe (logs stay readable)
            pbar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        window: dict[str, float] = {"loss": 0.0, "loss_diff": 0.0, "loss_clip": 0.0, "n_diff": 0.0, "n_clip": 0.0,
                                    "ratio": 0.0, "n": 0,
                                    "data_s": 0.0, "t0": time.perf_counter(), "steps": 0, "flop": 0.0}
        last: dict[str, Any] = {}
        steps_this_run = 0
        run_t0 = time.perf_counter()
        elapsed0 = self.elapsed_s
        try:
            with _StopFlag() as stop:
                while self.samples_seen < self.total_samples:
                    if budget_s is not None and self.elapsed_s >= budget_s:
                        stopped_by = "max_minutes"
                        break
                    self.engine.set_lr(self.schedule.lr(self.samples_seen, self.global_batch))
                    good = 0
                    while good < t.grad_accum:
                        td = time.perf_counter()
                        batch = next(self.data.stream)
                        inputs = self.maker(batch, self.gen)
                        window["data_s"] += time.perf_counter() - td
                        epoch = self.samples_seen / self.epoch_size
                        r = sample_mask_ratio(cfg.mask, epoch, self.np_rng)
                        n_masked = num_masked(r, L)
                        order = random_orders(B, L, device=info.device, generator=self.gen)
                        res = self.runner.micro_step(inputs, n_masked, order)
                        if res is None:
                            self.bad_total += 1
                            self.bad_run += 1
                            log.warning("non-finite loss at step %d (%d in a row): micro-batch skipped",
                                        self.step, self.bad_run)
                            if self.bad_run >= t.max_bad_steps:
                                raise NonFiniteLossError(
                                    f"{self.bad_run} consecutive non-finite losses (train.max_bad_steps="
                                    f"{t.max_bad_steps}) at step {self.step}: lower the lr (optim.blr), check "
                                    "the data, or use precision fp32; the last good checkpoint is "
                                    f"{self.last_ckpt}")
                            continue
                        self.bad_run = 0
                        good += 1
                        self.samples_seen += B * info.world_size  # trained on (a skipped batch is not)
                        for k in ("loss", "loss_diff", "loss_clip", "n_diff", "n_clip"):
                            window[k] += res[k]
                        window["ratio"] += n_masked / L
                        window["n"] += 1
                        # useful work only: a weight-0 decoder slice (multi-rank) is not model FLOPs
                        window["flop"] += flops_per_sample(cfg.model, n_masked / L,
                                                           decoder=cfg.loss.diff_eligible(n_masked, L))
                    self.runner.post_step()
                    self.step += 1
                    steps_this_run += 1
                    window["steps"] += 1
                    self.elapsed_s = elapsed0 + (time.perf_counter() - run_t0)
                    if pbar is not None:
                        pbar.update(1)
                    if self.step % t.log_every == 0 or self.samples_seen >= self.total_samples:
                        last = self._log(window, pbar)
                        window = {k: 0.0 for k in window}
                        window["t0"] = time.perf_counter()
                    cb_stop = self.on_step is not None and bool(self.on_step(
                        {"step": self.step, "total_steps": self.total_steps, "loss": res["loss"],
                         "samples_seen": self.samples_seen, "epoch": self.samples_seen / self.epoch_size,
                         "elapsed_s": self.elapsed_s}))
                    # one collective decides for all ranks: signal on any rank, or rank 0's budget
                    over = budget_s is not None and self.elapsed_s >= budget_s
                    flag = all_reduce_max((2.0 if stop.signal is not None else 0.0) + (1.0 if over else 0.0)
                                          + (0.5 if cb_stop else 0.0), info.device)
                    if flag >= 2.0:
                        stopped_by = "signal"
                    elif flag >= 1.0:
                        stopped_by = "max_minutes"
                    elif flag >= 0.5:
                        stopped_by = "callback"
                    if flag >= 0.5:
                        break
                    if self.step % t.ckpt_every == 0 and self.samples_seen < self.total_samples:
                        self.save()
            if steps_this_run > 0 or self.last_ckpt is None:
                self.save()
        finally:
            if pbar is not None:
                pbar.close()
            self.metrics.close()
        stats = self.data.stream.stats
        skipped = all_reduce_mean([float(stats.get("skipped_samples", 0)), float(stats.get("skipped_shards", 0))],
                                  info.device)
        n = info.world_size
        if info.is_main and (skipped[0] or skipped[1]):
            log.warning("data: skipped %d corrupt/undecodable samples and %d broken shard reads",
                        round(skipped[0] * n), round(skipped[1] * n))
        return TrainResult(self.out_dir, self.step, self.samples_seen / self.epoch_size, last, self.last_ckpt,
                           self.metrics.path, stopped_by, round(skipped[0] * n), round(skipped[1] * n),
                           self.bad_total, self.resumed_from, self.history)

    def _log(self, w: dict[str, float], pbar: Any) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        n = max(w["n"], 1)
        # loss_diff / loss_clip: means over the micro-batches that had the term (the diffusion loss is skipped
        # below 50% masked, InfoNCE above 75%); sums and counts are reduced over ranks before dividing.
        loss, ratio, diff_sum, n_diff, clip_sum, n_clip = all_reduce_mean(
            [w["loss"] / n, w["ratio"] / n, w["loss_diff"], w["n_diff"], w["loss_clip"], w["n_clip"]], info.device)
        dt = max(time.perf_counter() - w["t0"], 1e-9)
        samples_s = w["steps"] * self.global_batch / dt
        flops = w["flop"] / n * samples_s  # per-micro-batch FLOP counts (the decoder is skipped below 50%)
        epoch = self.samples_seen / self.epoch_size
        stats = self.data.stream.stats
        rec: dict[str, Any] = {
            "epoch": round(epoch, 5),
            "loss": loss, "loss_diff": diff_sum / n_diff if n_diff > 0 else 0.0,
            "loss_clip": clip_sum / n_clip if n_clip > 0 else 0.0,
            "mask_ratio": ratio,
            "mu": mask_mu(cfg.mask, epoch) if cfg.mask.schedule == "warmup" else None,
            "lr": self.schedule.lr(self.samples_seen - self.global_batch, self.global_batch),
            "samples_per_s": samples_s,
            "tokens_per_s": samples_s * cfg.model.seq_len,
            "tflops": flops / 1e12,
            "mfu": flops / 1e12 / (self.peak * info.world_size) if self.peak > 0 else None,
            "peak_mem_mb": peak_memory_mb(info.device),
            "data_wait": min(w["data_s"] / dt, 1.0),
            "grad_norm": self.engine.grad_norm(),
            "bad_steps": self.bad_total,
            "skipped_samples": int(stats.get("skipped_samples", 0)),
            "elapsed_s": round(self.elapsed_s, 2),
        }  # fmt: skip
        self.metrics.log(self.step, rec)
        self.history.append({"step": self.step, **rec})
        if info.is_main:
            line = format_line(self.step, self.total_steps, rec)
            if pbar is not None:
                pbar.set_postfix_str(f"loss {rec['loss']:.4f} {samples_s:.0f} samples/s", refresh=False)
            log.info(line)
        return rec
