"""Typed configuration for dream_fast: dataclasses, size presets, YAML load with validation.

Every field has a one-line docstring comment; names follow the MAR/DREAM reference flags where
users already know them (`mask_ratio_std`, `diffloss_d`, `diffloss_w`, `buffer_size`, ...).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and what is allowed."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of one DREAM model (docs/design.md §1)."""

    img_size: int = 256  # input image side in pixels
    tokenizer: Literal["vae", "pixel"] = "vae"  # image -> tokens: frozen SD-VAE latents or raw pixel patches
    vae_path: str | None = None  # local diffusers AutoencoderKL directory (tokenizer: vae)
    vae_stride: int = 8  # VAE spatial downsampling factor
    vae_channels: int = 4  # VAE latent channels
    vae_scale: float = 0.18215  # latent scaling factor
    patch_size: int = 2  # patch side on the latent grid (vae) or on pixels (pixel)
    buffer_size: int = 64  # learned buffer tokens prepended, never masked
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * width unless mlp_dim is set
    mlp_dim: int | None = None  # explicit MLP hidden size (DREAM-G: 8192)
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    proj_hidden: int = 1024  # StableRep projection MLP hidden width
    proj_dim: int = 256  # contrastive embedding size (image projection and text projection)
    text_width: int = 512  # CLIP-style text tower
    text_depth: int = 12
    text_heads: int = 8
    text_context: int = 77  # text tower context length (tokens incl. start/end)
    vocab_size: int = 49408  # BPE vocabulary (CLIP's size by default)
    text_cond: Literal["t5", "precomputed", "tower"] = "t5"  # decoder text source
    tower_cond_grad: bool = False  # text_cond tower: let the diffusion loss train the tower through the decoder
    # text_cond tower: the decoder also reads each caption word's LayerNorm'd embedding, so no word fades from view
    tower_cond_embed: bool = False
    t5_path: str | None = None  # local transformers T5EncoderModel directory (text_cond: t5)
    t5_dim: int = 1024  # T5 hidden size (T5-Large: 1024)
    t5_len: int = 128  # T5 tokens per caption (padded)
    aligner_depth: int = 6  # text aligner self-attention blocks at decoder width
    diffloss_d: int = 3  # diffusion head residual blocks
    diffloss_w: int = 1024  # diffusion head width
    diffusion_batch_mul: int = 4  # independent timesteps per masked token in training
    num_train_timesteps: int = 1000
    num_sampling_steps: int = 100  # respaced steps of the head at sampling time
    noise_schedule: Literal["cosine", "linear"] = "cosine"
    diffusion_weighting: Literal["eps", "v"] = "eps"  # head loss per timestep: MAR's ε-MSE, or ×1/ᾱ_t (v-loss)
    # per-token loss weight 1 + α·(spatial std), mean 1: structure inside a token counts more (docs/design.md §6)
    diffusion_detail_weight: float = 0.0
    label_drop_prob: float = 0.1  # caption dropout for classifier-free guidance
    attn_backend: Literal["auto", "flash", "sdpa", "xformers", "math"] = "auto"
    kernels: Literal["auto", "reference", "triton"] = "auto"  # fused-op provider (env DREAM_KERNELS wins)
    grad_checkpointing: bool = False
    pos_init: Literal["normal", "sincos"] = "normal"  # image-token position embeddings: N(0, 0.02) or 2-D sin-cos

    @property
    def grid(self) -> int:
        """Tokens per image side."""
        base = self.img_size // self.vae_stride if self.tokenizer == "vae" else self.img_size
        return base // self.patch_size

    @property
    def seq_len(self) -> int:
        """L: image tokens per image (buffer excluded)."""
        return self.grid**2

    @property
    def token_channels(self) -> int:
        """Image channels inside a token (3 for pixels, the latent channels for the VAE)."""
        return self.vae_channels if self.tokenizer == "vae" else 3

    @property
    def token_dim(self) -> int:
        """C: channels of one image token (token_channels x patch_size^2)."""
        return self.token_channels * self.patch_size**2

    @property
    def text_cond_dim(self) -> int:
        """Width of the decoder's text input before the aligner's input projection."""
        return self.text_width if self.text_cond == "tower" else self.t5_dim

    @property
    def text_cond_len(self) -> int:
        return self.text_context if self.text_cond == "tower" else self.t5_len


@dataclass
class MaskConfig:
    """Mask-ratio sampling (docs/design.md §1.7)."""

    schedule: Literal["warmup", "fluid", "fixed"] = "warmup"  # Masking Warmup, FLUID/MAR baseline, constant
    mask_ratio_std: float = 0.45  # sigma of the truncated normal (warmup)
    mu_start: float = 0.0  # mu0
    mu_end: float = 1.0  # mu1 (may exceed 1: r then concentrates near 1)
    warmup_start_epoch: float = 0.0  # W0
    warmup_end_epoch: float = 36.0  # W1
    shape: Literal["linear", "cosine"] = "linear"  # how mu moves from mu0 to mu1
    fluid_mean: float = 1.0  # FLUID: TruncNormal(mean, std) on [fluid_min, 1]
    fluid_std: float = 0.25
    fluid_min: float = 0.7
    fixed_ratio: float = 0.75  # schedule: fixed


@dataclass
class LossConfig:
    """Objective weights and eligibility filters (docs/design.md §1.3, §1.6)."""

    diff_weight: float = 1.0
    clip_weight: float = 0.005  # 0 turns the contrastive side off (FLUID baseline)
    clip_critic_threshold: float = 0.25  # min visible fraction for a sample to enter InfoNCE
    diff_threshold: float = 0.5  # min masked ratio for a micro-batch's diffusion loss
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)

    def diff_eligible(self, n_masked: int, seq_len: int) -> bool:
        """Whether a micro-batch with n_masked of seq_len tokens masked has a diffusion loss."""
        return n_masked > 0 and n_masked / seq_len >= self.diff_threshold

    def clip_eligible(self, n_masked: int, seq_len: int) -> bool:
        """Whether its samples are visible enough to enter InfoNCE (as queries and as negatives)."""
        return (seq_len - n_masked) / seq_len >= self.clip_critic_threshold


@dataclass
class DataConfig:
    """Where training images come from."""

    source: Literal["shapes", "webdataset", "cache"] = "shapes"
    shards: str | None = None  # brace pattern / list / `pipe:` command (webdataset, cache)
    shapes_dir: str = "data/shapes"  # where embedded shapes shards are written/read
    shapes_num_train: int = 50000
    shapes_num_val: int = 2000
    shapes_seed: int = 0
    # batches of runs of this many images whose captions differ only in the shape word (hard negatives; 1: shuffle)
    shapes_group_size: int = 1
    tokenizer_path: str | None = None  # BPE tokenizer.json; trained on the captions when absent
    num_workers: int = 1
    shuffle_buffer: int = 1000
    hflip: bool = True  # random horizontal flip (off for the shapes domain: it swaps left/right)
    # samples per epoch (default: counted in local shards; remote `pipe:`/URL shards are never streamed to count
    # them: set it, or put a manifest.json next to them)
    epoch_size: int | None = None


@dataclass
class OptimConfig:
    """AdamW, schedule, clipping, EMA (docs/design.md §1.8)."""

    blr: float = 1e-4  # lr = blr * global_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.04
    warmup_epochs: float = 12.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    grad_clip: float = 3.0
    ema_decay: float = 0.9999


@dataclass
class TrainConfig:
    """One training run."""

    epochs: float = 48.0
    batch_size: int = 64  # per rank, per micro-batch
    grad_accum: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    max_minutes: float | None = None  # stop (and checkpoint) after this wall time
    # auto: bf16 where its matmuls are fast (CUDA with bf16; a CPU whose bf16 matmul measures >= 1.5x
    # fp32, e.g. AVX512-BF16/AMX, plain-PyTorch engine only), fp32 otherwise; resolved at the start of a run
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = 0
    engine: Literal["auto", "deepspeed", "torch"] = "auto"  # auto: plain PyTorch for 1 process w/o ZeRO
    deepspeed_config: str | None = None  # user JSON that overrides the generated one
    out_dir: str = "runs/dream"
    log_every: int = 50
    ckpt_every: int = 1000  # steps between checkpoints
    keep_ckpts: int = 2
    # every checkpoint also holds portable.safetensors (fp32 weights + Adam moments, 12 bytes/parameter,
    # gathered on rank 0): resume on another number of ranks or the other engine
    elastic_ckpt: bool = True
    resume: str | None = None  # "auto", a checkpoint dir, or None
    seed: int = 0
    max_bad_steps: int = 20  # consecutive non-finite losses before stopping
    threads: int | None = None  # torch intra-op threads on CPU (None: torch default)
    # torch.compile (dream_fast/compile.py): off (eager), block (each transformer block and the head
    # compiled alone), step (the whole forward + backward; plain PyTorch engine only)
    compile: Literal["off", "block", "step"] = "off"
    # process-group timeout: the rendezvous and every collective (a dead or stuck rank raises, never hangs)
    dist_timeout_s: float = 1800.0


@dataclass
class SampleConfig:
    """Generation defaults (docs/design.md §1.9)."""

    num_iter: int = 64  # masked-generation steps N
    cfg: float = 3.0
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = 1.0
    num_candidates: int = 5  # SAD K (1 = plain sampling)
    sad_threshold: int = 32  # SAD T: candidates scored after this many steps
    sad_greedy: bool = False  # re-score K fillings at every step after T
    cuda_graphs: bool = True
    # torch.compile of the sampler (dream_fast/compile.py): off, block (blocks + one head timestep),
    # step (encoder, decoder and the head's whole loop of a generation step)
    compile: Literal["off", "block", "step"] = "off"


@dataclass
class DreamConfig:
    """Everything one run needs."""

    name: str = "dream"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> DreamConfig:
        validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

# docs/design.md §1.10: width, depth (encoder = decoder), heads, MLP hidden.
SIZES: dict[str, dict[str, Any]] = {
    "B": dict(width=768, depth=12, heads=12, mlp_dim=None),
    "L": dict(width=1024, depth=16, heads=16, mlp_dim=None),
    "H": dict(width=1280, depth=20, heads=16, mlp_dim=None),
    "G": dict(width=1664, depth=24, heads=16, mlp_dim=8192),
}


def _sized(size: str) -> DreamConfig:
    s = SIZES[size]
    cfg = DreamConfig(name=f"dream_{size.lower()}")
    m = cfg.model
    m.enc_width = m.dec_width = s["width"]
    m.enc_depth = m.dec_depth = s["depth"]
    m.enc_heads = m.dec_heads = s["heads"]
    m.mlp_dim = s["mlp_dim"]
    cfg.data.source = "webdataset"
    return cfg


def preset_tiny() -> DreamConfig:
    """CPU preset on the embedded shapes data: 32-px images, 4x4 pixel tokens, ~3M params."""
    cfg = DreamConfig(name="tiny")
    m = cfg.model
    m.img_size, m.tokenizer, m.patch_size, m.buffer_size = 32, "pixel", 4, 16
    m.enc_width = m.dec_width = 128
    m.enc_depth = m.dec_depth = 4
    m.enc_heads = m.dec_heads = 4
    m.attn_dropout = m.proj_dropout = 0.0
    m.proj_hidden, m.proj_dim = 256, 64
    m.text_width, m.text_depth, m.text_heads, m.text_context, m.vocab_size = 128, 2, 4, 16, 1000
    m.text_cond, m.aligner_depth = "tower", 2
    # the decoder reads the word embeddings too, so InfoNCE can use hard negatives without starving it of position
    m.tower_cond_embed = True
    cfg.data.shapes_group_size, cfg.loss.clip_weight = 3, 0.05
    m.diffloss_d, m.diffloss_w = 3, 128
    m.num_sampling_steps = 50
    m.noise_schedule = "linear"  # docs/design.md §3: cosine gave incoherent per-patch backgrounds on pixels
    m.pos_init = "sincos"  # neighbouring tokens start alike, so position is learnt sooner on the 8x8 grid
    m.diffusion_batch_mul = 2  # ~25% cheaper steps at high mask ratios: more steps in the 10-minute demo
    # edge tokens carry a shape's outline: weigh tokens by inner structure so the decoder learns to draw inside them
    m.diffusion_detail_weight = 5.0
    # Masking Warmup ends at half the run and at mu 1.5 (> 1: more text-only steps; 1.5 balances probe and generation)
    cfg.mask.warmup_end_epoch = 4.0
    cfg.mask.mu_end = 1.5
    cfg.data.source, cfg.data.hflip = "shapes", False
    # lr 5e-4 at batch 64 (blr 2e-3): at 1e-3 and above the decoder stayed on a plateau and never learnt position
    cfg.optim.blr, cfg.optim.warmup_epochs, cfg.optim.ema_decay = 2e-3, 0.5, 0.999
    # auto: bf16 autocast on CPUs with fast bf16 matmuls (AVX512-BF16: 1.5x per step), fp32 elsewhere
    cfg.train.epochs, cfg.train.batch_size, cfg.train.precision = 8.0, 64, "auto"
    cfg.train.out_dir, cfg.train.log_every, cfg.train.ckpt_every = "runs/tiny", 20, 500
    cfg.sample.num_iter, cfg.sample.sad_threshold, cfg.sample.num_candidates = 16, 8, 5
    cfg.sample.temperature = 0.5  # tokens of one shape drawn in the same step agree on its colour
    return cfg


def preset_bench_ref_tiny() -> DreamConfig:
    """Exactly the configuration the DREAM reference code was timed at (docs/design.md §5)."""
    cfg = DreamConfig(name="bench_ref_tiny")
    m = cfg.model
    m.img_size, m.tokenizer, m.vae_stride, m.patch_size, m.buffer_size = 128, "vae", 8, 2, 16
    m.enc_width = m.dec_width = 128
    m.enc_depth = m.dec_depth = 4
    m.enc_heads = m.dec_heads = 4
    m.proj_hidden, m.proj_dim = 256, 64
    m.text_width, m.text_depth, m.text_heads, m.text_context, m.vocab_size = 128, 2, 4, 16, 1000
    m.text_cond, m.t5_dim, m.t5_len, m.aligner_depth = "precomputed", 64, 16, 2
    m.diffloss_d, m.diffloss_w, m.diffusion_batch_mul, m.num_sampling_steps = 3, 128, 4, 50
    cfg.train.batch_size, cfg.train.precision = 64, "fp32"
    cfg.sample.num_iter, cfg.sample.cfg, cfg.sample.sad_threshold = 16, 3.0, 8
    return cfg


def preset_fluid(size: str = "B") -> DreamConfig:
    """FLUID/MAR baseline: FLUID masking, no contrastive loss."""
    cfg = _sized(size)
    cfg.name = f"fluid_{size.lower()}"
    cfg.mask.schedule = "fluid"
    cfg.loss.clip_weight = 0.0
    return cfg


PRESETS: dict[str, Any] = {
    "tiny": preset_tiny,
    "bench_ref_tiny": preset_bench_ref_tiny,
    "B": lambda: _sized("B"),
    "L": lambda: _sized("L"),
    "H": lambda: _sized("H"),
    "G": lambda: _sized("G"),
    "fluid_B": lambda: preset_fluid("B"),
    "fluid_L": lambda: preset_fluid("L"),
    "fluid_H": lambda: preset_fluid("H"),
}


def get_preset(name: str) -> DreamConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]().validate()


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` against the annotation `tp`; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: got {value!r}; allowed values: {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string; it is clearly a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return value


def _build(cls: type, data: Any, where: str, base: Any = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {data!r}")
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown field {path!r}; allowed fields: {names}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            setattr(obj, key, _build(tp, value, path, getattr(obj, key)))
        else:
            setattr(obj, key, _coerce(value, tp, path))
    return obj


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: DreamConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    m, k, s, t = cfg.model, cfg.mask, cfg.sample, cfg.train
    for name in ("enc", "dec"):
        w, h = getattr(m, f"{name}_width"), getattr(m, f"{name}_heads")
        _check(w > 0 and h > 0 and w % h == 0,
               f"model.{name}_width ({w}) must be a positive multiple of model.{name}_heads ({h})")
        _check(m.pos_init != "sincos" or w % 4 == 0,
               f"model.pos_init: sincos needs model.{name}_width divisible by 4, got {w}")
    _check(m.text_width % m.text_heads == 0,
           f"model.text_width ({m.text_width}) must be a multiple of model.text_heads ({m.text_heads})")
    base = m.img_size // m.vae_stride if m.tokenizer == "vae" else m.img_size
    _check(m.img_size > 0 and (m.tokenizer != "vae" or m.img_size % m.vae_stride == 0),
           f"model.img_size ({m.img_size}) must be a positive multiple of model.vae_stride ({m.vae_stride})")
    _check(m.patch_size > 0 and base % m.patch_size == 0,
           f"model.patch_size ({m.patch_size}) must divide the token grid side ({base})")
    _check(m.buffer_size >= 0, f"model.buffer_size must be >= 0, got {m.buffer_size}")
    for f in ("attn_dropout", "proj_dropout", "label_drop_prob"):
        v = getattr(m, f)
        _check(0.0 <= v < 1.0, f"model.{f} must be in [0, 1), got {v}")
    _check(m.diffusion_batch_mul >= 1, f"model.diffusion_batch_mul must be >= 1, got {m.diffusion_batch_mul}")
    _check(m.diffusion_detail_weight >= 0,
           f"model.diffusion_detail_weight must be >= 0 (0 = plain mean over tokens), got {m.diffusion_detail_weight}")
    _check(1 <= m.num_sampling_steps <= m.num_train_timesteps,
           f"model.num_sampling_steps must be in [1, model.num_train_timesteps={m.num_train_timesteps}], "
           f"got {m.num_sampling_steps}")
    _check(m.text_context >= 3, f"model.text_context must be >= 3 (start, one token, end), got {m.text_context}")
    _check(0 <= k.mu_start <= 3 and 0 <= k.mu_end <= 3,
           f"mask.mu_start and mask.mu_end must lie in [0, 3] (the paper uses 0 -> 1; above 1 the truncated "
           f"normal piles up near ratio 1), got {k.mu_start} and {k.mu_end}")
    _check(k.mask_ratio_std > 0, f"mask.mask_ratio_std must be > 0, got {k.mask_ratio_std}")
    _check(k.warmup_end_epoch >= k.warmup_start_epoch, "mask.warmup_end_epoch must be >= mask.warmup_start_epoch")
    _check(0 <= k.fluid_min < 1 and k.fluid_std > 0, "mask.fluid_min must be in [0, 1) and mask.fluid_std > 0")
    _check(0 <= k.fixed_ratio <= 1, f"mask.fixed_ratio must be in [0, 1], got {k.fixed_ratio}")
    _check(cfg.loss.clip_weight >= 0 and cfg.loss.diff_weight >= 0, "loss weights must be >= 0")
    _check(1 <= cfg.data.shapes_group_size <= 3,
           f"data.shapes_group_size must be in [1, 3] (there are 3 shapes), got {cfg.data.shapes_group_size}")
    _check(t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
    _check(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage: got {t.zero_stage}; allowed values: [0, 1, 2, 3]")
    _check(cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
    _check(0 <= cfg.optim.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")
    _check(s.num_iter >= 1, f"sample.num_iter must be >= 1, got {s.num_iter}")
    _check(s.num_candidates >= 1, f"sample.num_candidates must be >= 1, got {s.num_candidates}")
    _check(1 <= s.sad_threshold < s.num_iter or s.num_candidates == 1,
           f"sample.sad_threshold must be in [1, sample.num_iter-1={s.num_iter - 1}], got {s.sad_threshold}")
    _check(s.cfg >= 1.0, f"sample.cfg must be >= 1.0, got {s.cfg}")
    _check(s.temperature > 0, f"sample.temperature must be > 0, got {s.temperature}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.batch_size=32` -> (["train", "batch_size"], 32) with YAML value parsing."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None) -> DreamConfig:
    """Build a config: optional preset, then the YAML file (may name `preset:`), then overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    preset = data.pop("preset", preset)
    cfg = get_preset(preset) if preset else DreamConfig()
    cfg = _build(DreamConfig, data, "", cfg)
    for ov in overrides or []:
        keys, value = parse_override(ov)
        nested: dict[str, Any] = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _build(DreamConfig, nested, "", cfg)
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> DreamConfig:
    """Rebuild a config saved with `DreamConfig.to_dict` (checkpoints, exports)."""
    return _build(DreamConfig, dict(data), "", DreamConfig()).validate()
