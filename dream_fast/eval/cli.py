"""`dream-fast eval <what>`: probe | zeroshot | retrieval | align | fid | oracle from the command line.

Data arguments take image-text shards (pattern, glob or list), a class-subfolder tree, or a flat
folder of images with NAME.txt captions / NAME.json metas beside them. Results print as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dream_fast.eval.fid import MissingDependencyError

WHATS = ("probe", "zeroshot", "retrieval", "align", "fid", "oracle")


def _common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        p.add_argument(
            "--checkpoint",
            required=True,
            metavar="DIR",
            help="inference bundle (model.safetensors + config.yaml + tokenizer.json) from export",
        )
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument(
        "--max-samples", type=int, default=None, help="read at most this many images per data source"
    )
    p.add_argument("--out", default=None, metavar="JSON", help="also write the result to this file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    data_help = (
        "image-text shards (pattern/glob/list), a folder of class subfolders, "
        "or a folder of images with .txt/.json sidecars"
    )

    p = sub.add_parser("probe", help="linear probe of the frozen encoder (buffer-mean features)")
    _common(p)
    p.add_argument("--train", required=True, metavar="DATA", help=f"training images: {data_help}")
    p.add_argument("--val", required=True, metavar="DATA", help="validation images (same kinds)")
    p.add_argument(
        "--label-key",
        default="shape_id",
        help="json metadata label for shards / flat folders (default shape_id)",
    )
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--optimizer", choices=("lars", "adamw"), default="lars")
    p.add_argument("--lr", type=float, default=None, help="default 6.4 (LARS) / 1e-3 (AdamW)")
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "zeroshot", help="zero-shot classification from class prompts with the model's own towers"
    )
    _common(p)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument(
        "--label-key",
        default="shape_id",
        help="json metadata label (integer class index); shapes keys get caption-grammar prompts by default",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="comma-separated class names in label order (default: folder names or the shapes vocabulary)",
    )
    p.add_argument(
        "--templates",
        default=None,
        metavar="FILE",
        help="prompt templates, one per line with {} for the class name",
    )
    p.add_argument("--prompts-per-class", type=int, default=64, help="shapes caption prompts per class")

    p = sub.add_parser("retrieval", help="image<->text retrieval recall@1/@5 with the model's own towers")
    _common(p)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument(
        "--exact-pairs",
        action="store_true",
        help="count only the query's own pair as correct (default: any pair with an identical caption)",
    )

    p = sub.add_parser(
        "align", help="alignment score: 100 x cosine of own-tower image and caption embeddings"
    )
    _common(p)
    p.add_argument(
        "--data", required=True, help=f"{data_help} (generated images: PNG + same-name .txt prompt)"
    )

    p = sub.add_parser("fid", help="FID and Inception Score via torch-fidelity's Inception (the `fid` extra)")
    _common(p, checkpoint=False)
    p.add_argument("--gen", required=True, metavar="DIR", help="folder of generated images")
    p.add_argument(
        "--ref",
        required=True,
        help="reference: stats .npz (mu, sigma), an image folder, or image-text shards",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="local Inception weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)",
    )
    p.add_argument(
        "--save-ref-stats", default=None, metavar="NPZ", help="write the reference mu/sigma here for reuse"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser(
        "oracle", help="shapes attribute oracle: per-attribute accuracy on seen / held-out combinations"
    )
    _common(p, checkpoint=False)
    p.add_argument(
        "--data",
        default=None,
        help=f"{data_help}; metas need the shapes *_id keys (shapes_eval_prompts / make_sample)",
    )
    p.add_argument(
        "--fd-ref",
        default=None,
        metavar="DATA",
        help="also report the Fréchet distance in oracle-feature space against these images",
    )
    p.add_argument(
        "--selftest",
        type=int,
        default=0,
        metavar="N",
        help="measure the oracle itself on N fresh renders of each of val and heldout",
    )
    p.add_argument("--img-size", type=int, default=32, help="side the images are read at (default 32)")


def _load(args: argparse.Namespace) -> Any:
    from dream_fast.pretrained import load_pretrained

    return load_pretrained(args.checkpoint, device=args.device)


def _images(args: argparse.Namespace, source: str, img_size: int, label_key: str | None = None) -> Any:
    from dream_fast.eval.features import EvalImages

    return EvalImages(source, img_size, label_key=label_key, max_samples=args.max_samples)


def _pil_and_metas(args: argparse.Namespace, source: str) -> tuple[list[Any], list[dict[str, Any]]]:
    from dream_fast.data.transforms import to_pil

    data = _images(args, source, args.img_size).load()
    pils = to_pil(data["image"])
    return (pils if isinstance(pils, list) else [pils]), data["meta"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    what = args.what
    if what == "probe":
        from dream_fast.eval.probe import linear_probe

        pre = _load(args)
        size = pre.cfg.model.img_size
        train = _images(args, args.train, size, args.label_key)
        val = _images(args, args.val, size, args.label_key)
        if train.kind == "classes":  # labels are folder indices, not metadata
            train.label_key = val.label_key = None
        return linear_probe(
            pre.model,
            train,
            val,
            args.label_key if train.kind != "classes" else None,
            epochs=args.epochs,
            batch_size=args.probe_batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            class_names=train.class_names,
            extract_batch_size=args.batch_size,
        )
    if what == "zeroshot":
        from dream_fast.eval.zeroshot import (
            DEFAULT_TEMPLATES,
            SHAPES_LABEL_KEYS,
            prompts_from_templates,
            shapes_class_prompts,
            zero_shot_classify,
        )

        pre = _load(args)
        data = _images(args, args.data, pre.cfg.model.img_size, args.label_key)
        if data.kind == "classes":
            data.label_key = None
        names = args.class_names.split(",") if args.class_names else data.class_names
        if args.templates:
            templates = [t for t in Path(args.templates).read_text().splitlines() if t.strip()]
        else:
            templates = None
        if names is None and templates is None:
            key = args.label_key if args.label_key.endswith("_id") else f"{args.label_key}_id"
            if key not in SHAPES_LABEL_KEYS:
                raise ValueError("give --class-names (or a class-folder tree) for non-shapes labels")
            names, prompts = shapes_class_prompts(key, args.prompts_per_class)
        else:
            if names is None:
                raise ValueError("--templates needs class names: give --class-names or a class-folder tree")
            prompts = prompts_from_templates(
                [n.replace("_", " ") for n in names], templates or DEFAULT_TEMPLATES
            )
        res = zero_shot_classify(
            pre.model, pre.tokenizer, data, prompts, data.label_key, names, batch_size=args.batch_size
        )
        res.pop("predictions")
        return res
    if what == "retrieval":
        from dream_fast.eval.retrieval import retrieval

        pre = _load(args)
        data = _images(args, args.data, pre.cfg.model.img_size)
        return retrieval(
            pre.model, pre.tokenizer, data, group_by_caption=not args.exact_pairs, batch_size=args.batch_size
        )
    if what == "align":
        from dream_fast.eval.retrieval import alignment_on

        pre = _load(args)
        res = alignment_on(
            pre.model,
            pre.tokenizer,
            _images(args, args.data, pre.cfg.model.img_size),
            batch_size=args.batch_size,
        )
        res.pop("per_sample")
        return res
    if what == "fid":
        from dream_fast.eval.fid import fid_with_torch_fidelity

        return fid_with_torch_fidelity(
            args.gen,
            args.ref,
            args.inception_weights,
            args.batch_size,
            args.device,
            max_images=args.max_samples,
            save_ref_stats=args.save_ref_stats,
        )
    if what == "oracle":
        from dream_fast.eval.oracle import oracle_report, shapes_fd

        if not args.data and not args.selftest:
            raise ValueError("give --data (images with shapes metas) and/or --selftest N")
        res: dict[str, Any] = {}
        if args.selftest:
            from dream_fast.data.shapes import make_sample

            ims, metas = [], []
            for split in ("val", "heldout"):
                for i in range(args.selftest):
                    im, _, meta = make_sample(4242, split, i, img_size=args.img_size)
                    ims.append(im)
                    metas.append(meta)
            res["selftest"] = oracle_report(ims, metas)
        if args.data:
            ims, metas = _pil_and_metas(args, args.data)
            res.update(oracle_report(ims, metas))
            if args.fd_ref:
                ref, _ = _pil_and_metas(args, args.fd_ref)
                res["shapes_fd"] = shapes_fd(ims, ref)
        return res
    raise ValueError(f"unknown eval target {what!r}; choose from {WHATS}")


def main(args: argparse.Namespace) -> int:
    try:
        res = run(args)
    except MissingDependencyError as e:
        print(f"dream-fast eval {args.what}: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=1, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0
