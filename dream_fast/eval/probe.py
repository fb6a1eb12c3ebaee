"""Linear probe of the frozen encoder: BatchNorm(affine=False) + Linear on cached buffer features.

docs/design.md §1.11: features extracted once (frozen encoder, no augmentation), then LARS (or AdamW)
with warmup + cosine for 90 epochs, which is cheap because only the head trains.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream_fast.eval.features import EvalImages, extract, images_to_tokens, probe_features


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017).

    For parameters with ndim > 1: g <- (g + wd p) * eta ||p|| / ||g + wd p|| (ratio 1 while either
    norm is 0); biases and 1-D parameters take plain momentum SGD without decay.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient),
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ratio = torch.where(
                        (p_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * p_norm / g_norm,
                        torch.ones_like(p_norm),
                    )
                    g = g * ratio
                buf = self.state[p].get("momentum")
                if buf is None:
                    buf = self.state[p]["momentum"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


class ProbeHead(nn.Module):
    """BatchNorm1d(affine=False) then Linear: the MAE/DREAM linear-probe head."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x_ND))


def _encode_labels(train: Sequence[Any], val: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Integer labels for both sets: ints stay as they are, other values map through the
    sorted classes of the training set. Returns (y_train, y_val, class values)."""
    tr = [v.item() if isinstance(v, torch.Tensor) else v for v in train]
    va = [v.item() if isinstance(v, torch.Tensor) else v for v in val]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in tr + va):
        if min(tr + va) < 0:
            raise ValueError("integer labels must be >= 0")
        classes: list[Any] = list(range(max(tr + va) + 1))
        return torch.tensor(tr), torch.tensor(va), classes
    classes = sorted(set(tr), key=str)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in va if v not in index})
    if unknown:
        raise ValueError(f"validation labels {unknown[:5]} never occur in the training set")
    return torch.tensor([index[v] for v in tr]), torch.tensor([index[v] for v in va]), classes


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * t))


def _accuracy(logits_NK: torch.Tensor, y_N: torch.Tensor, k: int = 1) -> float:
    top = logits_NK.topk(min(k, logits_NK.shape[1]), dim=1).indices
    return float((top == y_N[:, None]).any(dim=1).float().mean())


def train_linear_head(
    x_train_ND: torch.Tensor,
    y_train_N: torch.Tensor,
    x_val_MD: torch.Tensor,
    y_val_M: torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 90,
    batch_size: int = 256,
    optimizer: str = "lars",
    lr: float | None = None,
    weight_decay: float = 0.0,
    warmup_epochs: int | None = None,
    seed: int = 0,
    class_names: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Train the probe head on fixed features and evaluate it.

    lr defaults to 6.4 for LARS (MAE's 0.1 x 16384/256; the trust ratio makes each step a
    relative change of lr * 0.001, so small batches need no smaller lr) and 1e-3 for AdamW; warmup defaults
    to epochs/9 (10 of 90), then cosine to 0, stepped per iteration. Accuracies are fractions.
    Returns {"top1", "top5", "train_top1", "per_class", "num_classes", "num_train", "num_val",
    "epochs", "optimizer", "lr"}.
    """
    if optimizer not in ("lars", "adamw"):
        raise ValueError(f"optimizer must be 'lars' or 'adamw', got {optimizer!r}")
    if x_train_ND.dim() != 2 or x_val_MD.dim() != 2 or x_train_ND.shape[1] != x_val_MD.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D), got {tuple(x_train_ND.shape)} and {tuple(x_val_MD.shape)}"
        )
    if len(y_train_N) != len(x_train_ND) or len(y_val_M) != len(x_val_MD):
        raise ValueError("one label per feature row is needed")
    if len(x_train_ND) < 2 or epochs < 1:
        raise ValueError(
            f"need >= 2 training rows and epochs >= 1, got {len(x_train_ND)} rows, {epochs} epochs"
        )
    K = int(num_classes or int(max(y_train_N.max(), y_val_M.max())) + 1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # head init
    x_tr, x_va = x_train_ND.float(), x_val_MD.float()
    y_tr, y_va = y_train_N.long(), y_val_M.long()
    head = ProbeHead(x_tr.shape[1], K)
    bs = min(batch_size, len(x_tr))
    if lr is None:
        lr = 6.4 if optimizer == "lars" else 1e-3
    opt = (
        LARS(head.parameters(), lr, weight_decay)
        if optimizer == "lars"
        else torch.optim.AdamW(head.parameters(), lr, weight_decay=weight_decay)
    )
    steps_per_epoch = max(1, len(x_tr) // bs)  # drop the ragged last batch: BN needs > 1 row
    total = epochs * steps_per_epoch
    warmup = (round(epochs / 9) if warmup_epochs is None else warmup_epochs) * steps_per_epoch
    step = 0
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, warmup, lr)
            loss = F.cross_entropy(head(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        logits_va, logits_tr = head(x_va), head(x_tr)
    pred = logits_va.argmax(dim=1)
    names = list(class_names) if class_names is not None else list(range(K))
    per_class = {}
    for k in range(K):
        sel = y_va == k
        if sel.any():
            per_class[str(names[k]) if k < len(names) else str(k)] = float((pred[sel] == k).float().mean())
    return {
        "top1": _accuracy(logits_va, y_va, 1),
        "top5": _accuracy(logits_va, y_va, 5),
        "train_top1": _accuracy(logits_tr, y_tr, 1),
        "per_class": per_class,
        "num_classes": K,
        "num_train": len(x_tr),
        "num_val": len(x_va),
        "epochs": epochs,
        "optimizer": optimizer,
        "lr": lr,
    }


def _features_and_labels(
    model: nn.Module | None,
    data: Any,
    label_key: str | None,
    image_tokenizer: nn.Module | None,
    batch_size: int,
) -> tuple[torch.Tensor, list[Any], list[str] | None]:
    """(features (N, D), labels, class names or None) from any accepted probe input."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        labels = y.tolist() if isinstance(y, torch.Tensor) else list(y)
        if x.dim() == 2:
            return x.float(), labels, None
        if model is None:
            raise ValueError(f"got images/tokens of shape {tuple(x.shape)} but no model to extract features")
        feats = []
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size]
            tokens = images_to_tokens(model, chunk, image_tokenizer) if chunk.dim() == 4 else chunk
            feats.append(probe_features(model, tokens.to(next(model.parameters()).device)).cpu())
        return torch.cat(feats), labels, None
    if model is None:
        raise ValueError(
            "a model is needed to extract features from images; pass (features, labels) otherwise"
        )
    out = extract(model, data, "probe", label_key, image_tokenizer, batch_size)
    if out["labels"] is None:
        raise ValueError(
            "the data carries no labels: give label_key (a json metadata key) or a class-folder tree"
        )
    return out["features"], out["labels"], getattr(data, "class_names", None)


def linear_probe(
    model: nn.Module | None,
    train: Any,
    val: Any,
    label_key: str | None = "shape_id",
    epochs: int = 90,
    batch_size: int = 256,
    optimizer: str = "lars",
    lr: float | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    image_tokenizer: nn.Module | None = None,
    class_names: Sequence[Any] | None = None,
    extract_batch_size: int = 128,
) -> dict[str, Any]:
    """Linear probe of `model`'s frozen encoder (buffer-mean features of unmasked images).

    train / val: an EvalImages source, an iterable of batch dicts ("image" + "meta" or
    "label"; e.g. a loader of ImageTextShards(with_meta=True)), or a tuple (x, labels) where x
    is images (N, 3, H, W) in [-1, 1], tokens (N, L, C), or features (N, D) (then model may be
    None). label_key names the json metadata label (shape_id, colour_id, ...).
    Returns train_linear_head's dict plus "feature_dim" and "label_key".
    """
    x_tr, lab_tr, names = _features_and_labels(model, train, label_key, image_tokenizer, extract_batch_size)
    x_va, lab_va, _ = _features_and_labels(model, val, label_key, image_tokenizer, extract_batch_size)
    y_tr, y_va, classes = _encode_labels(lab_tr, lab_va)
    if class_names is None:
        class_names = names if names is not None else _shapes_names(label_key, classes)
    res = train_linear_head(
        x_tr,
        y_tr,
        x_va,
        y_va,
        len(classes),
        epochs,
        batch_size,
        optimizer,
        lr,
        weight_decay,
        seed=seed,
        class_names=class_names,
    )
    return {**res, "feature_dim": int(x_tr.shape[1]), "label_key": label_key}


def _shapes_names(label_key: str | None, classes: list[Any]) -> list[Any]:
    """Attribute names for shapes-meta integer labels (shape_id -> circle, ...), else the classes."""
    from dream_fast.data.shapes import SPEC

    vocab = {
        "shape_id": SPEC.shapes,
        "colour_id": SPEC.colours,
        "position_id": SPEC.positions,
        "size_id": SPEC.sizes,
        "background_id": SPEC.backgrounds,
    }.get(label_key or "")
    if vocab is not None and classes == list(range(len(classes))) and len(classes) <= len(vocab):
        return list(vocab[: len(classes)])
    return classes


__all__ = ["LARS", "EvalImages", "ProbeHead", "linear_probe", "train_linear_head"]
