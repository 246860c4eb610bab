"""Classification metrics computed from logits and labels: top-k, confusion matrix, per-class P/R/F1,
and for multi-label data AP/mAP with thresholded P/R/F1."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .errors import UserError


def meaningful_ks(num_classes: int, ks: tuple[int, ...] = (1, 5)) -> tuple[int, ...]:
    """The k of top-k worth reporting: top-1, and k below the number of classes (with k >= classes every
    label is among the k best and top-k is 100 whatever the model)."""
    return tuple(k for k in ks if k == 1 or k < num_classes)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %...} for the meaningful k of these logits' class count."""
    ks = meaningful_ks(logits.shape[1], ks)
    correct = topk_correct(logits, labels, ks)
    n = max(1, len(labels))
    return {f"top{k}": 100.0 * correct[k] / n for k in ks}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest logits, for each k (k clipped to the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {k: int(hits[:, :min(k, maxk)].any(dim=1).sum()) for k in ks}


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (fractions; 0 where undefined) and support from a confusion matrix."""
    n = cm.shape[0]
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    actual = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    return precision, recall, f1, actual


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Everything eval.py reports, as plain Python types ready for YAML."""
    n = len(classes)
    labels_np = labels.numpy().astype(np.int64)
    preds = logits.argmax(dim=1).numpy().astype(np.int64)
    cm = confusion_matrix(preds, labels_np, n)
    precision, recall, f1, actual = precision_recall_f1(cm)
    present = actual > 0
    return {
        "num_samples": int(len(labels_np)),
        **topk_accuracy(logits, labels),  # top5 only with more than 5 classes
        "macro_f1": 100.0 * float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {c: {"precision": 100.0 * float(precision[i]), "recall": 100.0 * float(recall[i]),
                          "f1": 100.0 * float(f1[i]), "support": int(actual[i])} for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }


# --------------------------------------------------------------------------- multi-label


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class (fraction 0..1): mean precision at the rank of each positive, highest score first.

    Ties keep the input order (stable sort) so the value is deterministic; nan without positives,
    which callers leave out of the mean rather than count as 0.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives).reshape(-1) > 0
    if not positives.any():
        return float("nan")
    hits = positives[np.argsort(-scores, kind="stable")]
    ranks = np.flatnonzero(hits) + 1
    return float((np.cumsum(hits)[ranks - 1] / ranks).mean())


def multilabel_probs(logits: torch.Tensor, background_index: int | None = None,
                     threshold: float | Sequence[float] = 0.5) -> torch.Tensor:
    """Independent per-class probabilities (sigmoid, float32; of calibrated logits where the caller scaled them).

    With `background_index`, the background probability is zeroed wherever another class reaches
    `threshold` (its own, with per-class thresholds): an image with a detected object is not also "background".
    """
    probs = torch.sigmoid(logits.detach().float())
    if background_index is None:
        return probs
    num_classes = probs.shape[1]
    if not -num_classes <= background_index < num_classes:
        raise UserError(f"background index {background_index} is out of range for {num_classes} classes")
    background_index %= num_classes
    cut = torch.as_tensor(threshold, dtype=torch.float32).expand(num_classes)
    others = torch.cat([probs[:, :background_index], probs[:, background_index + 1:]], dim=1)
    others_cut = torch.cat([cut[:background_index], cut[background_index + 1:]])
    probs[(others >= others_cut).any(dim=1), background_index] = 0.0
    return probs


def _mean_ap(probs: np.ndarray, targets: np.ndarray) -> tuple[list[float], float]:
    """Per-class AP (nan without positives) and their mean over classes with positives (0.0 if none)."""
    aps = [average_precision(probs[:, c], targets[:, c]) for c in range(targets.shape[1])]
    present = [ap for ap in aps if not np.isnan(ap)]
    return aps, float(np.mean(present)) if present else 0.0


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 (fractions; 0 where undefined) from true/false positive and false negative counts."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    predicted, actual = tp + fp, tp + fn
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                   where=(precision + recall) > 0)
    return precision, recall, f1


def multilabel_report(logits: torch.Tensor, targets: torch.Tensor, classes: list[str],
                      threshold: float | Sequence[float] = 0.5, background_index: int | None = None
                      ) -> dict[str, Any]:
    """The multi-label counterpart of classification_report, as plain Python types ready for YAML.

    `targets` is (N, C) multi-hot. mAP is threshold-free; precision/recall/F1 and exact match use
    `threshold` (one, or one per class; of calibrated logits where the caller scaled them). Percentages
    throughout; per-class "ap" is None for a class without positives.
    """
    if logits.dim() != 2 or tuple(targets.shape) != tuple(logits.shape):
        raise UserError(f"multi-label targets of shape {tuple(targets.shape)} do not match logits of shape "
                        f"{tuple(logits.shape)}")
    if logits.shape[1] != len(classes):
        raise UserError(f"logits have {logits.shape[1]} columns for {len(classes)} classes")
    probs = multilabel_probs(logits, background_index, threshold).cpu().numpy()
    truth = targets.detach().cpu().float().numpy() > 0.5
    preds = probs >= np.asarray(threshold, dtype=np.float32)
    tp = (preds & truth).sum(axis=0)
    fp = (preds & ~truth).sum(axis=0)
    fn = (~preds & truth).sum(axis=0)
    precision, recall, f1 = _prf(tp, fp, fn)
    micro_p, micro_r, micro_f1 = (float(v[0]) for v in _prf([tp.sum()], [fp.sum()], [fn.sum()]))
    support = truth.sum(axis=0)
    present = support > 0
    aps, mean_ap = _mean_ap(probs, truth)
    n = len(truth)

    def macro(values: np.ndarray) -> float:
        return 100.0 * float(values[present].mean()) if present.any() else 0.0

    return {
        "num_samples": int(n),
        "threshold": float(threshold) if np.ndim(threshold) == 0 else [round(float(v), 4) for v in threshold],
        "mAP": 100.0 * mean_ap,
        "micro": {"precision": 100.0 * micro_p, "recall": 100.0 * micro_r, "f1": 100.0 * micro_f1},
        "macro": {"precision": macro(precision), "recall": macro(recall), "f1": macro(f1)},
        "exact_match": 100.0 * float((preds == truth).all(axis=1).mean()) if n else 0.0,
        "per_class": {c: {"ap": None if np.isnan(aps[i]) else 100.0 * aps[i],
                          "precision": 100.0 * float(precision[i]), "recall": 100.0 * float(recall[i]),
                          "f1": 100.0 * float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)},
    }


def primary_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The number that ranks models (higher is better): top-1 % for class-index labels (1-D),
    mAP % of plain sigmoid scores for multi-hot labels (2-D)."""
    if len(labels) == 0:
        return 0.0
    if labels.dim() == 1:
        return 100.0 * topk_correct(logits, labels, (1,))[1] / len(labels)
    if labels.dim() == 2:
        probs = torch.sigmoid(logits.detach().float()).cpu().numpy()
        return 100.0 * _mean_ap(probs, labels.detach().cpu().float().numpy() > 0.5)[1]
    raise UserError(f"labels must be class indices (N,) or multi-hot (N, C), got shape {tuple(labels.shape)}")
