"""`dream-fast sample`: generate images from prompts with a pretrained bundle and write PNGs, a
captioned grid and a JSON record (prompt, seed, candidate scores, chosen candidate, timings).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="inference bundle directory (from `dream-fast export`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts", help="UTF-8 text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-candidates", "--num_candidates", type=int, default=None, help="SAD K (1 = plain sampling)")
    p.add_argument(
        "--threshold",
        "--clip_critic_threshold",
        type=int,
        default=None,
        help="SAD T: candidates are scored after this many steps",
    )
    p.add_argument("--steps", "--num_iter", type=int, default=None, help="generation steps N")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (>= 1)")
    p.add_argument("--cfg-schedule", "--cfg_schedule", choices=["linear", "constant"], default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument(
        "--greedy",
        action="store_true",
        default=None,
        help="greedy SAD: re-score K fillings every step after T",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the sampler eagerly on CUDA")
    p.add_argument("--image", default=None, help="inpainting/outpainting: the image to complete")
    p.add_argument("--mask", default=None, help="inpainting mask, same size as --image (white = generate)")
    p.add_argument("--grid-cols", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a UTF-8 file; clear errors for a missing, undecodable or empty file."""
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"prompt file {path!r} is not UTF-8 (byte {e.start}, line {line}); save it as UTF-8") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts (one per line expected)")
    return prompts


def main(args: argparse.Namespace) -> int:
    from dream_fast.data.transforms import caption_grid
    from dream_fast.sampling.pipeline import DreamPipeline

    prompts = read_prompts(args.prompts) if args.prompts else list(args.prompt)
    if not prompts:
        raise ValueError("no prompts given; use --prompt TEXT or --prompts FILE")
    if (args.image is None) != (args.mask is None):
        raise ValueError("inpainting needs both --image and --mask")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = DreamPipeline.from_pretrained(
        args.checkpoint,
        device=args.device,
        dtype=dtype,
        use_cuda_graphs=False if args.no_cuda_graphs else None,
    )
    # settings are checked before any output is written
    pipe.resolve(
        args.num_candidates,
        args.threshold,
        args.steps,
        args.cfg,
        args.cfg_schedule,
        args.temperature,
        args.greedy,
    )
    out = Path(args.out)
    res = pipe(
        prompts,
        num_candidates=args.num_candidates,
        threshold=args.threshold,
        steps=args.steps,
        cfg=args.cfg,
        cfg_schedule=args.cfg_schedule,
        temperature=args.temperature,
        seed=args.seed,
        batch_size=args.batch_size,
        greedy=args.greedy,
        progress=not args.no_progress,
        image=args.image,
        mask=args.mask,
    )
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, img) in enumerate(zip(res.prompts, res.images)):
        name = f"{i:05d}.png"
        img.save(out / name)
        records.append(
            {
                "file": name,
                "prompt": prompt,
                "seed": res.seeds[i],
                "candidate_scores": None if res.scores is None else res.scores[i],
                "chosen": None if res.chosen is None else res.chosen[i],
            }
        )
    caption_grid(res.images, res.prompts, ncols=args.grid_cols).save(out / "grid.png")
    meta = {
        "checkpoint": str(args.checkpoint),
        "settings": res.settings,
        "timings": res.timings,
        "samples": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    t = res.timings
    print(
        f"wrote {len(records)} images, grid.png and samples.json to {out} "
        f"({t['per_image_s']:.3f} s/image; sample {t['sample_s']:.2f}s, decode {t['decode_s']:.2f}s)"
    )
    return 0
