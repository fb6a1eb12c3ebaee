"""Training engines: DeepSpeed (ZeRO 0-3, any number of ranks/nodes) and plain PyTorch (one process).

Both expose forward / backward / step / set_lr / save / load with the same semantics (gradient
accumulation, clipping at optim.grad_clip, AdamW on the recipe's groups), so the trainer is one
code path. The DeepSpeed JSON is generated from our config; a user JSON is merged over it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dream_fast.compile import compile_for_training, skip_zero_dropout
from dream_fast.config import ConfigError, DreamConfig
from dream_fast.dist import DistInfo
from dream_fast.train.ema import Shard, full_shards
from dream_fast.train.metrics import measured_matmul_tflops
from dream_fast.train.optim import build_optimizer, set_lr

log = logging.getLogger(__name__)

ENGINES = ("auto", "deepspeed", "torch")


def engine_kind(cfg: DreamConfig, world_size: int) -> str:
    """Resolve train.engine: auto = plain PyTorch for one process without ZeRO or a user DS JSON
    (DeepSpeed adds nothing there but per-step overhead), DeepSpeed otherwise."""
    kind = cfg.train.engine
    if kind not in ENGINES:
        raise ConfigError(f"train.engine: got {kind!r}; allowed values: {list(ENGINES)}")
    if kind == "auto":
        plain = world_size == 1 and cfg.train.zero_stage == 0 and not cfg.train.deepspeed_config
        return "torch" if plain else "deepspeed"
    if kind == "torch" and (world_size > 1 or cfg.train.zero_stage > 0):
        raise ConfigError(
            f"train.engine='torch' runs one process without ZeRO (here world_size={world_size}, "
            f"train.zero_stage={cfg.train.zero_stage}); use train.engine=deepspeed or auto"
        )
    return kind


def cpu_bf16_speedup(n: int = 512) -> float:
    """bf16 / fp32 throughput of an n x n x n matmul on this CPU: > 1 where bf16 is native."""
    return _cpu_bf16_speedup(n, torch.get_num_threads())


@functools.cache
def _cpu_bf16_speedup(n: int, _threads: int) -> float:
    cpu = torch.device("cpu")
    return measured_matmul_tflops(cpu, n, torch.bfloat16) / measured_matmul_tflops(cpu, n, torch.float32)


CPU_BF16_MIN_SPEEDUP = 1.5


def resolve_precision(cfg: DreamConfig, device: torch.device, world_size: int = 1) -> str:
    """The concrete train.precision for this run ("auto" resolved; other values returned as they are).

    auto: bf16 on CUDA devices that support it; on CPU, bf16 only under the plain PyTorch engine (one
    process: no ranks to disagree on a measurement) and only where a bf16 matmul measures at least
    CPU_BF16_MIN_SPEEDUP x faster than fp32 (AVX512-BF16 or AMX); fp32 otherwise."""
    prec = cfg.train.precision
    if prec != "auto":
        return prec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and engine_kind(cfg, world_size) == "torch":
        speedup = cpu_bf16_speedup()
        chosen = "bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "fp32"
        log.info("train.precision auto -> %s (bf16 matmul %.1fx fp32 on this CPU)", chosen, speedup)
        return chosen
    return "fp32"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: DreamConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: batch sizes, clipping, ZeRO stage, precision; user JSON over it.

    Parity notes: clipping is set explicitly (DeepSpeed's default is 1.0, the recipe's 3.0) and the
    optimizer is our torch AdamW passed as a client optimizer (DeepSpeed's own "Adam" config would
    default to AdamW mode with its own groups)."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": t.zero_stage},
        # gradients are averaged in fp32 whatever the weights' dtype: a bf16 sum over 32+ ranks loses
        # the small updates of late training (2x the reduce bytes of bf16; see docs/training.md)
        "communication_data_type": "fp32",
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.zero_stage in (1, 2):
        # Reduce buckets while the backward still runs. Safe with per-rank mask ratios only because every
        # rank builds the same graph (model.same_graph_every_rank): buckets fill in hook order.
        ds["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    if t.zero_stage == 3:
        # Gather every module's weights once per forward and keep small ones resident (defaults).
        ds["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False, overlap_comm=True)
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: file {str(path)!r} does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {e}") from e
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ConfigError(
                    f"train.deepspeed_config: {path} has an {key!r} section; the optimizer (AdamW groups) "
                    "and the lr schedule come from the optim: section of the YAML -- remove it"
                )
        ds = _merge(ds, user)
        # The batch layout must stay the trainer's: the data loader and schedule depend on it.
        for key, want in (("train_micro_batch_size_per_gpu", t.batch_size),
                          ("gradient_accumulation_steps", t.grad_accum)):  # fmt: skip
            if ds.get(key) != want:
                raise ConfigError(f"train.deepspeed_config sets {key}={ds.get(key)}, but the YAML says "
                                  f"{want}; set it in the YAML (train.batch_size / train.grad_accum) instead")
        ds["train_batch_size"] = t.batch_size * t.grad_accum * world_size
        stage = ds.get("zero_optimization", {}).get("stage", t.zero_stage)
        if stage != t.zero_stage:
            raise ConfigError(f"train.deepspeed_config sets zero stage {stage}, the YAML train.zero_stage="
                              f"{t.zero_stage}; set train.zero_stage instead")
    return ds


def _promote_scalar_params(model: nn.Module) -> dict[str, torch.Size]:
    """DeepSpeed 0.19 cannot broadcast 0-dim parameters (it views them as bytes): make them (1,).

    Returns {name: original shape} so state dicts can be written back in the model's own shapes."""
    shapes: dict[str, torch.Size] = {}
    for mod_name, mod in model.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0:
                full = f"{mod_name}.{name}" if mod_name else name
                shapes[full] = p.shape
                setattr(mod, name, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    return shapes


def canonical_state(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    return {k: (v.reshape(shapes[k]) if k in shapes else v) for k, v in state.items()}


class TorchEngine:
    """Plain PyTorch: AdamW, autocast for bf16/fp16, accumulation by loss scaling, clip_grad_norm_."""

    kind = "torch"
    zero_stage = 0

    def __init__(self, model: nn.Module, cfg: DreamConfig, info: DistInfo, fast: bool = True):
        # fast=False: the plain eager reference of the benchmarks (per-parameter AdamW loop, rate-0
        # dropouts kept); train.compile applies either way (docs/performance.md)
        self.module = model.to(info.device)
        self.optimizer = build_optimizer(model, cfg.optim, fast=fast)
        if fast:
            skip_zero_dropout(model)
        self._forward = compile_for_training(model, cfg.train.compile)  # the module itself when off
        self.grad_accum, self.clip = cfg.train.grad_accum, cfg.optim.grad_clip
        self.device = info.device
        prec = cfg.train.precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self.scaler = torch.amp.GradScaler(info.device.type) if prec == "fp16" else None
        self.micro = 0
        self.last_grad_norm: float | None = None
        self.param_shapes: dict[str, torch.Size] = {}

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        with self.autocast():
            return self._forward(*args, **kwargs)

    def input_dtype(self) -> torch.dtype:
        return torch.float32

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> bool:
        """Counts a micro-batch; updates the weights on the accumulation boundary (returns True)."""
        self.micro += 1
        if self.micro % self.grad_accum:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.clip > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def grad_norm(self) -> float | None:
        return self.last_grad_norm

    def clamp_param_(self, name: str, max_value: float) -> None:
        with torch.no_grad():
            self.module.get_parameter(name).clamp_(max=max_value)

    def ema_shards(self) -> tuple[list[Shard], bool]:
        """The module's own fp32 parameters, whole on every rank."""
        return full_shards(list(self.module.named_parameters())), False

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def portable_state(self) -> dict[str, torch.Tensor]:
        """World-size-independent state: {param.N, exp_avg.N, exp_avg_sq.N} in fp32 on CPU (see PORTABLE)."""
        out: dict[str, torch.Tensor] = {}
        for n, p in self.module.named_parameters():
            st = self.optimizer.state.get(p, {})
            out[f"param.{n}"] = p.detach().float().cpu()
            for key in ADAM_MOMENTS:
                out[f"{key}.{n}"] = st[key].detach().float().cpu() if key in st else torch.zeros(p.shape)
        return out

    def load_portable(self, state: dict[str, torch.Tensor], adam_steps: int) -> None:
        named = dict(self.module.named_parameters())
        _check_portable(state, named)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state[f"param.{n}"].reshape(p.shape))
                self.optimizer.state[p] = {"step": torch.tensor(float(adam_steps)),
                                           **{k: state[f"{k}.{n}"].reshape(p.shape).to(p) for k in ADAM_MOMENTS}}
        self.micro = adam_steps * self.grad_accum

    def save(self, ckpt_dir: Path, is_main: bool) -> None:
        if not is_main:
            return
        save_file({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
                  str(ckpt_dir / "model.safetensors"))
        state = {"optimizer": self.optimizer.state_dict(), "micro": self.micro}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        if not (ckpt_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{ckpt_dir} has no model.safetensors: it was not written by the "
                                    "torch engine (resume with the engine that wrote it, e.g. train.engine=deepspeed)")
        self.module.load_state_dict(load_file(str(ckpt_dir / "model.safetensors"), device=str(self.device)))
        state = torch.load(ckpt_dir / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro = int(state["micro"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine:
    """deepspeed.initialize with our AdamW as client optimizer and the generated JSON."""

    kind = "deepspeed"

    def __init__(self, model: nn.Module, cfg: DreamConfig, info: DistInfo, ds_config: dict[str, Any],
                 dry_run_inputs: dict[str, Any] | None = None):
        import deepspeed

        self.param_shapes = _promote_scalar_params(model)
        model = model.to(info.device)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        if low is not None:
            # DeepSpeed casts parameters but not buffers; batch_norm needs its running stats in the
            # weights' dtype (CPU kernels refuse the mix).
            for mod in model.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                    mod.running_mean.data = mod.running_mean.data.to(low)
                    mod.running_var.data = mod.running_var.data.to(low)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage == 3 and dry_run_inputs is not None:
            register_external_params(model, dry_run_inputs)
        optimizer = build_optimizer(model, cfg.optim)
        if cfg.train.compile == "step":
            raise ValueError("train.compile='step' needs the plain PyTorch engine (train.engine=torch, "
                             "zero_stage 0); with DeepSpeed use train.compile='block' or 'off'")
        skip_zero_dropout(model)
        compile_for_training(model, cfg.train.compile)  # 'block': the blocks compiled in place
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=ds_config)
        self.module = self.engine.module
        self.device = info.device
        self.rank, self.world_size = info.rank, info.world_size
        prec = cfg.train.precision
        self._in_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
        # ZeRO and the bf16/fp16 optimizers keep fp32 masters (fragments on each rank; the safe_* helpers
        # gather them collectively); plain fp32 DeepSpeed steps the module's own parameters
        self.has_masters = self.zero_stage > 0 or low is not None

    def input_dtype(self) -> torch.dtype:
        return self._in_dtype  # DeepSpeed holds bf16/fp16 weights: float inputs must match

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def clamp_param_(self, name: str, max_value: float) -> None:
        """Clamp a parameter in the fp32 master copy too (ZeRO keeps its own), not only the view."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        p = self.module.get_parameter(name)
        master = safe_get_full_fp32_param(p)  # collective under ZeRO; None without a master copy
        with torch.no_grad():
            if master is None:
                p.clamp_(max=max_value)
                return
            if bool((master > max_value).any()):
                safe_set_full_fp32_param(p, master.clamp(max=max_value))
                if self.zero_stage < 3:
                    p.clamp_(max=max_value)

    def ema_shards(self) -> tuple[list[Shard], bool]:
        """This rank's pieces of the fp32 masters (ZeRO 1/2/3, bf16/fp16 optimizer), viewed in place: the
        EMA is sharded like the optimizer and reads no bf16 weight. Without masters (ZeRO-0, fp32) the
        module's own parameters, whole."""
        named = list(self.module.named_parameters())
        if not self.has_masters:
            return full_shards(named), False
        shards = []
        for n, p in named:
            if self.zero_stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param

                psize, start = p.ds_tensor.ds_numel, self.rank * p.ds_tensor.ds_numel
                view = safe_get_local_fp32_param(p).reshape(-1)[: max(0, min(psize, p.ds_numel - start))]
                shape = p.ds_shape
            else:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:  # no element of this parameter in this rank's partition
                    continue
                view, start, shape = mapping.hp_fragment.reshape(-1), mapping.lp_fragment_address.start, p.shape
            if view.numel() == 0:
                continue
            if not self._is_master_view(view):
                raise RuntimeError(f"the fp32 master of {n} is not resident (optimizer offload?): the EMA reads "
                                   "masters in place; turn off offload_optimizer, or use train.engine=torch")
            shards.append(Shard(n, shape, start, view))
        return shards, True

    def _is_master_view(self, view: torch.Tensor) -> bool:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        storages = {t.untyped_storage().data_ptr() for t in self._master_tensors(inner)}
        return view.untyped_storage().data_ptr() in storages

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Current (not EMA) weights, gathered under ZeRO-3 (collective)."""
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def portable_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 master weights and Adam moments, gathered one parameter at a time (collective: every
        rank calls it); rank 0 returns them, the other ranks {}."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out: dict[str, torch.Tensor] = {}
        self._link_moments()
        for n, p in self.module.named_parameters():
            if not self.has_masters:  # no ZeRO, fp32: the client optimizer holds the module's own params
                st = getattr(self.optimizer, "optimizer", self.optimizer).state.get(p, {})
                values = [p.detach(), *(st.get(k, torch.zeros_like(p)) for k in ADAM_MOMENTS)]
            else:
                master = safe_get_full_fp32_param(p)
                values = [master, *(_zero_moment(safe_get_full_optimizer_state(p, k), master) for k in ADAM_MOMENTS)]
            if self.rank == 0:
                for key, v in zip(("param", *ADAM_MOMENTS), values):
                    out[f"{key}.{n}"] = v.detach().float().cpu().reshape(_full_shape(p))
        return out

    def load_portable(self, state: dict[str, torch.Tensor], adam_steps: int) -> None:
        """Set every parameter's fp32 master, its low-precision copy and its Adam moments from a portable
        state written on any number of ranks by either engine (collective)."""
        import deepspeed
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        named = dict(self.module.named_parameters())
        _check_portable(state, named)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW ZeRO steps
        for flat in self._master_tensors(inner):  # torch creates Adam state lazily, at the first step
            st = inner.state[flat]
            for k in ADAM_MOMENTS:
                st.setdefault(k, torch.zeros_like(flat))
            st["step"] = torch.tensor(float(adam_steps))
        self._link_moments()
        for n, p in named.items():
            value = state[f"param.{n}"].to(self.device)
            with torch.no_grad():
                if self.zero_stage == 3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if self.rank == 0:
                            p.data.copy_(value.reshape(p.shape))
                else:
                    p.data.copy_(value.reshape(p.shape))
            if not self.has_masters:  # the client optimizer holds the module's params
                inner.state[p].update({k: state[f"{k}.{n}"].reshape(p.shape).to(p) for k in ADAM_MOMENTS})
                continue
            if self.zero_stage == 3:
                # this rank's slice of the padded flat tensor (DeepSpeed 0.19's full-value setter
                # over-runs the padded last partition of small parameters)
                safe_set_local_fp32_param(p, self._my_partition(p, value))
                for k in ADAM_MOMENTS:
                    safe_set_local_optimizer_state(p, self._my_partition(p, state[f"{k}.{n}"].to(self.device)), k)
                continue
            safe_set_full_fp32_param(p, value.reshape(p.shape))
            for k in ADAM_MOMENTS:
                safe_set_full_optimizer_state(p, state[f"{k}.{n}"].to(self.device).reshape(p.shape), k)

    def _my_partition(self, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        psize = p.ds_tensor.ds_numel
        flat = torch.zeros(psize * self.world_size, dtype=torch.float32, device=full.device)
        flat[: full.numel()] = full.reshape(-1)
        return flat[self.rank * psize : (self.rank + 1) * psize]

    def _link_moments(self) -> None:
        """ZeRO-1/2 and the bf16 optimizer map each parameter onto its Adam moment fragments once, right
        after the first step of the first param group, when the other groups have no state yet
        (DeepSpeed 0.19): map again now that every group has it, or their moments read as missing."""
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _master_tensors(self, inner: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The tensors the torch AdamW steps: ZeRO's flat fp32 partitions, else the module's parameters."""
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            flats = getattr(self.optimizer, attr, None)  # ZeRO-3, ZeRO-1/2, bf16 optimizer (DeepSpeed 0.19)
            if flats:
                return list(flats)
        return [p for g in inner.param_groups for p in g["params"]]

    def save(self, ckpt_dir: Path, is_main: bool) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag="deepspeed", save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        if not (ckpt_dir / "deepspeed").is_dir():
            raise FileNotFoundError(f"{ckpt_dir} has no deepspeed/ state: it was written by the torch engine "
                                    "(resume with train.engine=torch, or export its weights)")
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 keeps a 0-size placeholder


def _zero_moment(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if value is None else value  # no Adam state before the first step


def _check_portable(state: dict[str, torch.Tensor], named: dict[str, torch.Tensor]) -> None:
    want = {f"{k}.{n}" for n in named for k in ("param", *ADAM_MOMENTS)}
    missing, extra = sorted(want - set(state)), sorted(k for k in set(state) - want if k.startswith("param."))
    if missing or extra:
        raise ValueError(f"portable checkpoint does not match this model: {len(missing)} tensors missing "
                         f"(e.g. {missing[:3]}), {len(extra)} unknown parameters (e.g. {extra[:3]}); "
                         "resume with the model config the run was trained with")


def register_external_params(model: nn.Module, inputs: dict[str, Any]) -> int:
    """ZeRO-3 gathers a module's own weights when its forward runs. The fused kernels read some
    weights (z_proj, LayerNorms, the AdaLN block's Linears) from a parent's forward, so a dry run
    finds every parameter whose module never runs and registers it on the root model."""
    import deepspeed

    device = next(model.parameters()).device  # the model has moved to its device: the inputs follow it
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _a: called.add(id(mod))) for m in model.modules()]
    was_training = model.training
    model.eval()  # no BatchNorm running-stat update and no caption-dropout draw from the dry run
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    n = 0
    for mod in model.modules():
        if id(mod) in called or mod is model:
            continue
        for p in mod.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, p)
            n += 1
    log.info("ZeRO-3: %d parameters read outside their module's forward registered on the model", n)
    return n


def build_engine(model: nn.Module, cfg: DreamConfig, info: DistInfo, out_dir: Path | None = None,
                 dry_run_inputs: dict[str, Any] | None = None) -> TorchEngine | DeepSpeedEngine:
    """The engine train.engine asks for (see engine_kind), with SyncBN when there are several ranks."""
    kind = engine_kind(cfg, info.world_size)
    if info.world_size > 1 or cfg.train.zero_stage == 3:
        # every rank runs the same modules in the same order, whatever its mask ratio (DreamModel)
        model.same_graph_every_rank = True
    if info.world_size > 1:
        from dream_fast.train.syncbn import convert_sync_batchnorm

        model = convert_sync_batchnorm(model, info.device)
    if kind == "torch":
        return TorchEngine(model, cfg, info)
    ds = deepspeed_config(cfg, info.world_size)
    if out_dir is not None and info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "deepspeed_config.json").write_text(json.dumps(ds, indent=1))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if info.device.type == "cpu" else "cuda")
    return DeepSpeedEngine(model, cfg, info, ds, dry_run_inputs)

