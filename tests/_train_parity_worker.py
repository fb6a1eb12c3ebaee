"""Worker for tests/test_train_zero_parity.py: a few optimizer steps of a minimal DREAM on a fixed
global batch, either as one rank of a 2-rank DeepSpeed job (its half of the batch) or alone on the
whole batch (the reference). Writes losses, final weights and EMA for the test to compare.

Usage: RANK=r WORLD_SIZE=w MASTER_PORT=p python tests/_train_parity_worker.py OUT_DIR STAGES ENGINE
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

from dream_fast.config import get_preset  # noqa: E402
from dream_fast.model import build_model  # noqa: E402
from dream_fast.model.diffloss import DiffLoss  # noqa: E402

GLOBAL_B, STEPS = 8, 5


def mini_cfg(stage: int, engine: str, tmp: Path):
    cfg = get_preset("tiny")
    m = cfg.model
    m.img_size, m.patch_size, m.buffer_size = 16, 4, 4
    m.enc_width = m.dec_width = 32
    m.enc_depth = m.dec_depth = 1
    m.enc_heads = m.dec_heads = 2
    m.proj_hidden, m.proj_dim = 32, 16
    m.text_width, m.text_depth, m.text_heads, m.text_context, m.vocab_size = 32, 1, 2, 8, 300
    m.aligner_depth, m.diffloss_d, m.diffloss_w, m.diffusion_batch_mul = 1, 1, 32, 2
    m.label_drop_prob = 0.0  # caption dropout would draw per-rank randomness
    cfg.mask.schedule, cfg.mask.fixed_ratio = "fixed", 0.75  # the same ratio on every rank
    cfg.optim.lr, cfg.optim.warmup_epochs, cfg.optim.ema_decay = 2e-3, 0.0, 0.9
    cfg.optim.grad_clip = 0.05  # small enough to clip every step: the global norm must be right
    cfg.train.precision, cfg.train.zero_stage = "fp32", stage
    cfg.train.engine = engine  # the field the lead adds to TrainConfig; read with getattr meanwhile
    if engine == "deepspeed":
        # partition even tiny parameters, so ZeRO-3 really shards every weight in this test
        ds = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        path = tmp / f"ds_stage{stage}_rank{os.environ.get('RANK', '0')}.json"  # per rank: no write race
        path.write_text(json.dumps(ds))
        cfg.train.deepspeed_config = str(path)
    return cfg


def deterministic_diffloss(self, target_NC, z_NZ, generator=None):
    """DiffLoss with t and noise a function of each token's own values: a sample gets the same
    draws whichever rank holds it (the randomness of the real loss is per-rank, not per-sample)."""
    self._diffusions_on(target_NC.device)
    mul = self.diffusion_batch_mul
    target, z = target_NC.repeat(mul, 1), z_NZ.repeat(mul, 1)
    d = self.train_diffusion
    t = ((target[:, 0] + 2.0) * 4999.0).long() % d.num_timesteps
    noise = torch.sin(target * 12.9898 + 78.233 * torch.arange(target.shape[1], dtype=target.dtype))
    terms = d.training_losses(self.net, target, t, {"z_NZ": z}, noise=noise)
    return {k: v.mean() for k, v in terms.items()}


def global_batch(cfg, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    L, C, T = cfg.model.seq_len, cfg.model.token_dim, cfg.model.text_context
    tokens = torch.randn(GLOBAL_B, L, C, generator=g)
    ids = torch.full((GLOBAL_B, T), 2, dtype=torch.long)
    ids[:, 0] = 1
    ids[:, 1 : T - 2] = torch.randint(3, cfg.model.vocab_size, (GLOBAL_B, T - 3), generator=g)
    order = torch.rand(GLOBAL_B, L, generator=g).argsort(dim=1)
    return tokens, ids, order


def main() -> None:
    out_dir, stages, engine = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
    DiffLoss.forward = deterministic_diffloss
    from dream_fast.dist import all_reduce_mean, init_distributed, teardown
    from dream_fast.train.ema import EMA
    from dream_fast.train.engine import build_engine, canonical_state
    from dream_fast.train.inputs import ModelInputs, dummy_inputs
    from dream_fast.train.trainer import StepRunner

    torch.set_num_threads(1)
    info = init_distributed(use_deepspeed=engine == "deepspeed")
    results = {}
    try:
        for stage in stages:
            cfg = mini_cfg(stage, engine, out_dir)
            torch.manual_seed(0)
            model = build_model(cfg.model, cfg.loss)
            dry = dummy_inputs(cfg, 2, torch.device("cpu")) if stage == 3 else None
            eng = build_engine(model, cfg, info, dry_run_inputs=dry)
            ema = EMA(*eng.ema_shards(), decay=cfg.optim.ema_decay)
            runner = StepRunner(cfg, eng, ema, info, torch.Generator().manual_seed(0))
            per = GLOBAL_B // info.world_size
            rows = slice(info.rank * per, (info.rank + 1) * per)
            L = cfg.model.seq_len
            losses, grad_norms = [], []
            for step in range(STEPS + 2):
                tokens, ids, order = global_batch(cfg, step)
                # steps 0..4: parity (r = 0.75 everywhere); step 5: every rank below the diffusion
                # threshold; step 6: ranks on both sides of it (ZeRO-3 must not deadlock)
                n_masked = {STEPS: L // 4, STEPS + 1: (3 * L) // 4 if info.rank == 0 else L // 4}.get(step, 12)
                eng.set_lr(cfg.optim.lr)
                res = runner.micro_step(ModelInputs(tokens[rows], ids[rows]), n_masked, order[rows])
                runner.post_step()
                losses.append(all_reduce_mean([res["loss"]], info.device)[0])
                grad_norms.append(eng.grad_norm())
                print(f"stage {stage} step {step} loss {losses[-1]:.6f}", file=sys.stderr, flush=True)
                if step == STEPS - 1:  # weights and EMA after the parity steps (collectives: all ranks)
                    params = canonical_state(eng.full_state_dict(), eng.param_shapes)
                    ema_full = canonical_state(ema.full(), eng.param_shapes)
                    if info.is_main:
                        tensors = {
                            f"param.{k}": v.float().cpu().contiguous()
                            for k, v in params.items()
                            if v.is_floating_point()
                        }
                        tensors.update({f"ema.{k}": v.float().contiguous() for k, v in ema_full.items()})
                        save_file(tensors, str(out_dir / f"{engine}_stage{stage}.safetensors"))
            results[stage] = {"losses": losses, "grad_norms": grad_norms}
    finally:
        teardown(info)
    if info.is_main:
        (out_dir / f"{engine}_losses.json").write_text(json.dumps(results))


if __name__ == "__main__":
    from dream_fast.dist import exit_process

    main()
    exit_process(0)  # multi-rank: skip C++ static destructors (a gloo thread can abort there)
