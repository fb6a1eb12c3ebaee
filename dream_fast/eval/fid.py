"""Fréchet distance and Inception Score math (ours, numpy/scipy) and the optional Inception FID.

The Inception network comes from torch-fidelity (the `fid` extra, which needs torchvision) with
its weights read from a local file; everything else here has no optional dependency.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class MissingDependencyError(ImportError):
    """An optional extra is not installed; the message says which and how to get it."""


# --------------------------------------------------------------------------------------------
# Statistics and distances
# --------------------------------------------------------------------------------------------


def feature_stats(feats_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of N feature rows, float64, unbiased covariance (N - 1)."""
    f = np.asarray(feats_ND, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs an (N, D) array with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    When the product is singular enough that its square root is not finite, eps*I is added to
    both covariances; a square root with a non-negligible imaginary part (> 1e-3 on the
    diagonal) means the inputs are not covariance matrices and raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    D = mu1.shape[0]
    if mu1.shape != mu2.shape or s1.shape != (D, D) or s2.shape != (D, D):
        raise ValueError(
            f"frechet_distance needs mu (D,) and sigma (D, D) of equal D; got mu {mu1.shape}/{mu2.shape}, "
            f"sigma {s1.shape}/{s2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("frechet_distance: singular product of covariances; adding %g to their diagonals", eps)
        offset = np.eye(D) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off makes tiny imaginary parts; large ones mean a bad (non-PSD) input.
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrt of sigma1 @ sigma2 has imaginary part "
                f"{np.abs(covmean.imag).max():.3g}; are both sigmas covariance matrices?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def inception_score(probs_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal chunks of exp(E_x KL(p(y|x) || p(y))).

    probs_NK: class probabilities per image (rows sum to 1). 1.0 for identical rows; K for
    confident predictions spread evenly over K classes.
    """
    p = np.asarray(probs_NK, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"inception_score needs an (N, K) probability array, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(
            "inception_score needs probabilities (non-negative rows summing to 1); apply softmax"
        )
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in 1..N={p.shape[0]}, got {splits}")
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(axis=0, keepdims=True)
        # xlogy-style: terms with p = 0 contribute 0 (not nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(chunk > 0, chunk * (np.log(chunk) - np.log(py)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra: Any) -> Path:
    """Write a stats file (.npz with "mu" and "sigma", the pytorch-fid convention)."""
    p = Path(path)
    if p.suffix != ".npz":
        raise ValueError(f"stats files are .npz, got {str(p)!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        p,
        mu=np.asarray(mu, np.float64),
        sigma=np.asarray(sigma, np.float64),
        **{k: np.asarray(v) for k, v in extra.items()},
    )
    return p


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a .npz stats file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"stats file {str(p)!r} does not exist")
    with np.load(p) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(
                f"stats file {str(p)!r} lacks {missing} (has {z.files}); expected arrays 'mu' and 'sigma'"
            )
        return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)


# --------------------------------------------------------------------------------------------
# Inception FID / IS through torch-fidelity's feature extractor (optional extra)
# --------------------------------------------------------------------------------------------


def _inception(weights_path: str | os.PathLike | None, device: str) -> Any:
    if not weights_path:
        raise FileNotFoundError(
            "no Inception weights given: pass --inception-weights PATH (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth, downloaded beforehand; nothing is fetched)"
        )
    if not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"Inception weights file {str(weights_path)!r} does not exist; pass an existing file to "
            "--inception-weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:  # torch-fidelity itself, or torchvision under it
        raise MissingDependencyError(
            f"FID/IS need torch-fidelity and torchvision ({e}); install the extra: "
            "pip install 'dream-fast[fid]' (torchvision must match your torch build)"
        ) from e
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_path)
    )
    return net.to(device).eval()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (png/jpg/jpeg/webp) directly in `folder` or below it, sorted."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder {str(d)!r} does not exist")
    files = sorted(
        p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(f"image folder {str(d)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def _uint8_batches(
    source: str | os.PathLike, batch_size: int, img_size: int | None, max_images: int | None
) -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 batches from an image folder or image-text shards."""
    from PIL import Image

    if Path(source).is_dir():
        paths = list_images(source)[:max_images]
        for i in range(0, len(paths), batch_size):
            ims = []
            for p in paths[i : i + batch_size]:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if img_size and im.size != (img_size, img_size):
                        im = im.resize((img_size, img_size), Image.BICUBIC)
                    ims.append(np.asarray(im))
            yield np.stack(ims)
        return
    from dream_fast.data.shards import ImageTextShards

    if not img_size:
        raise ValueError("reading reference shards needs an image size (the generated images' size)")
    ds = ImageTextShards(str(source), img_size=img_size, shuffle_buffer=0, rank=0, world_size=1)
    buf, seen = [], 0
    for s in ds:
        buf.append(((s["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8))
        seen += 1
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
        if max_images is not None and seen >= max_images:
            break
    if buf:
        yield np.stack(buf)


def inception_features(
    source: str | os.PathLike,
    inception_weights_path: str | os.PathLike | None,
    img_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    max_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pool features (N, 2048), class probabilities (N, 1008)) of an image folder or shards."""
    import torch

    net = _inception(inception_weights_path, device)
    feats, probs = [], []
    with torch.no_grad():
        for batch in _uint8_batches(source, batch_size, img_size, max_images):
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device)
            pool, logits = net(x)
            feats.append(pool.double().cpu().numpy())
            probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    if not feats:
        raise ValueError(f"no images read from {str(source)!r}")
    return np.concatenate(feats), np.concatenate(probs)


def fid_with_torch_fidelity(
    gen_dir: str | os.PathLike,
    ref: str | os.PathLike,
    inception_weights_path: str | os.PathLike | None,
    batch_size: int = 64,
    device: str = "cpu",
    is_splits: int = 10,
    max_images: int | None = None,
    save_ref_stats: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """FID of the images in `gen_dir` against `ref` (a .npz stats file, an image folder or
    image-text shards such as the held-out split) and the Inception Score of `gen_dir`.

    Inception features come from torch-fidelity's network with weights from a local file;
    the distance and score are computed by `frechet_distance` / `inception_score` here.
    Reference images are resized to the generated images' size first. Returns
    {"fid", "is_mean", "is_std", "n_gen", "n_ref"} (n_ref is None for a stats file).
    """
    gen_paths = list_images(gen_dir)
    from PIL import Image

    with Image.open(gen_paths[0]) as im:
        side = im.size[0]
    feats, probs = inception_features(gen_dir, inception_weights_path, side, batch_size, device, max_images)
    mu_g, s_g = feature_stats(feats)
    n_ref = None
    if str(ref).endswith(".npz"):
        mu_r, s_r = load_stats(ref)
    else:
        ref_feats, _ = inception_features(ref, inception_weights_path, side, batch_size, device, max_images)
        mu_r, s_r = feature_stats(ref_feats)
        n_ref = len(ref_feats)
        if save_ref_stats:
            save_stats(save_ref_stats, mu_r, s_r, n=n_ref)
    is_mean, is_std = inception_score(probs, min(is_splits, len(probs)))
    return {
        "fid": frechet_distance(mu_g, s_g, mu_r, s_r),
        "is_mean": is_mean,
        "is_std": is_std,
        "n_gen": len(feats),
        "n_ref": n_ref,
    }
