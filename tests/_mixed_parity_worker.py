"""Worker for tests/test_train_mixed_parity.py: ranks that draw DIFFERENT mask ratios in one step.

Every step, one rank runs the decoder (r = 0.75), one skips it (r = 0.25, below the diffusion
threshold) and, with 3 ranks, one is below the contrastive threshold (r = 0.875); the roles rotate
over the steps. Every parameter that is zero at init (the diffusion head's output layer and adaLN
modulations, biases) is perturbed first, so a wrong gradient cannot hide behind a zero init.

Each SPEC runs from the same initial weights:
  ref              plain PyTorch data parallel: local backward, then one all-reduce per parameter in
                   a fixed order, divided by the world size (the textbook average of per-rank
                   gradients; no DeepSpeed, no buckets, no hooks), clip_grad_norm_, AdamW.
  z<stage><o|n><1|m>  DeepSpeed ZeRO <stage>, overlap_comm on (o) / off (n), one reduce bucket (1) or
                   many (m: reduce_bucket_size of a few thousand elements).
For each SPEC it writes the reduced gradient of every parameter after step 0 (DeepSpeed:
safe_get_full_grad, ZeRO-gathered) and the weights after STEPS optimizer steps with clipping on.

Usage: RANK=r WORLD_SIZE=w MASTER_PORT=p python tests/_mixed_parity_worker.py OUT_DIR SPEC[,SPEC...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_parity_worker as base  # noqa: E402
from _train_parity_worker import deterministic_diffloss, global_batch, mini_cfg  # noqa: E402

from dream_fast.model import build_model  # noqa: E402
from dream_fast.model.diffloss import DiffLoss  # noqa: E402

STEPS = 5
PER_RANK = 4  # samples per rank
base.GLOBAL_B = 3 * PER_RANK  # global_batch() draws enough rows for 3 ranks
MANY_BUCKETS = 4096  # elements per reduce bucket: the mini model's gradients fill dozens of them


def rank_masked(L: int, world: int, rank: int, step: int) -> int:
    """This rank's masked-token count at `step`: the roles run / skip / below-contrastive rotate."""
    roles = [(3 * L) // 4, L // 4, L - L // 8][:world]
    return roles[(rank + step) % world]


def perturb_zero_inits(model: torch.nn.Module, seed: int = 123) -> list[str]:
    """Give every all-zero parameter small random values (as after training); returns their names."""
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
                names.append(name)
    return names


def spec_config(spec: str, out_dir: Path):
    if spec == "ref":
        cfg = mini_cfg(0, "torch", out_dir)
        return cfg
    stage, overlap, buckets = int(spec[1]), spec[2] == "o", spec[3]
    cfg = mini_cfg(stage, "torch", out_dir)
    cfg.train.engine = "deepspeed"
    zero = {"stage": stage, "overlap_comm": overlap, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if buckets == "m":
        zero["reduce_bucket_size"] = MANY_BUCKETS
        zero["allgather_bucket_size"] = MANY_BUCKETS
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = MANY_BUCKETS
    path = out_dir / f"ds_{spec}_rank{os.environ.get('RANK', '0')}.json"  # one file per rank: no write race
    path.write_text(json.dumps({"zero_optimization": zero}))
    cfg.train.deepspeed_config = str(path)
    return cfg


class ReferenceDP:
    """Plain data parallel: the same calls as the trainer's engines, reduction done by hand."""

    def __init__(self, model, cfg, info):
        from dream_fast.train.optim import build_optimizer
        from dream_fast.train.syncbn import convert_sync_batchnorm

        self.module = convert_sync_batchnorm(model, info.device) if info.world_size > 1 else model
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.clip, self.world = cfg.optim.grad_clip, info.world_size
        self.param_shapes: dict = {}

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        import torch.distributed as dist

        loss.backward()
        for p in self.module.parameters():  # fixed order, one collective per parameter
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.world > 1:
                dist.all_reduce(g)
            p.grad = g / self.world

    def step(self):
        torch.nn.utils.clip_grad_norm_(list(self.module.parameters()), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr):
        from dream_fast.train.optim import set_lr

        set_lr(self.optimizer, lr)

    def reduced_grads(self):
        return {n: p.grad.detach().clone() for n, p in self.module.named_parameters()}

    def full_state_dict(self):
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def clamp_logit_scale(self, max_value):
        with torch.no_grad():
            self.module.logit_scale.clamp_(max=max_value)


def deepspeed_reduced_grads(eng) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for n, p in eng.module.named_parameters():  # collective under ZeRO: every rank, same order
        g = safe_get_full_grad(p)
        out[n] = (torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None else g.detach().clone())
    return out


def run_spec(spec: str, out_dir: Path, info) -> dict:
    from dream_fast.dist import all_reduce_mean
    from dream_fast.train.engine import build_engine, canonical_state
    from dream_fast.train.inputs import ModelInputs, dummy_inputs

    cfg = spec_config(spec, out_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    perturbed = perturb_zero_inits(model)
    if spec == "ref":
        eng = ReferenceDP(model, cfg, info)
    else:
        dry = dummy_inputs(cfg, 2, info.device) if cfg.train.zero_stage == 3 else None
        eng = build_engine(model, cfg, info, dry_run_inputs=dry)
    L = cfg.model.seq_len
    per = PER_RANK
    gen = torch.Generator().manual_seed(0)
    losses, grads = [], None
    for step in range(STEPS):
        tokens, ids, order = global_batch(cfg, step)
        rows = slice(info.rank * per, (info.rank + 1) * per)
        n_masked = rank_masked(L, info.world_size, info.rank, step)
        eng.set_lr(cfg.optim.lr)
        inp = ModelInputs(tokens[rows], ids[rows])
        out = eng.forward(inp.tokens_BLC, inp.ids_BT, n_masked, order[rows], generator=gen)
        eng.backward(out["loss"])
        if step == 0:
            grads = eng.reduced_grads() if spec == "ref" else deepspeed_reduced_grads(eng)
        eng.step()
        if spec == "ref":
            eng.clamp_logit_scale(cfg.loss.logit_scale_max)
        else:
            eng.clamp_param_("logit_scale", cfg.loss.logit_scale_max)
        losses.append(all_reduce_mean([float(out["loss"].detach())], info.device)[0])
    params = canonical_state(eng.full_state_dict(), eng.param_shapes)
    grads = canonical_state(grads, eng.param_shapes)
    if info.is_main:
        tensors = {f"grad.{k}": v.float().cpu().contiguous() for k, v in grads.items()}
        tensors.update({f"param.{k}": v.float().cpu().contiguous() for k, v in params.items()
                        if v.is_floating_point()})
        save_file(tensors, str(out_dir / f"mixed_{spec}_w{info.world_size}.safetensors"))
    return {"losses": losses, "perturbed": perturbed}


def main() -> None:
    out_dir, specs = Path(sys.argv[1]), sys.argv[2].split(",")
    DiffLoss.forward = deterministic_diffloss
    from dream_fast.dist import init_distributed, teardown

    torch.set_num_threads(1)
    info = init_distributed(use_deepspeed=any(s != "ref" for s in specs))
    results = {}
    try:
        for spec in specs:
            results[spec] = run_spec(spec, out_dir, info)
            print(f"rank {info.rank} {spec}: losses {results[spec]['losses']}", file=sys.stderr, flush=True)
    finally:
        teardown(info)
    if info.is_main:
        (out_dir / f"mixed_w{info.world_size}_{'_'.join(specs)}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    from dream_fast.dist import exit_process

    main()
    exit_process(0)
