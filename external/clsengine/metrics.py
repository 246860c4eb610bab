"""Classification metrics computed from logits and labels: top-k, confusion matrix, per-class P/R/F1."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
    total = max(1, len(labels_np))
    correct = topk_correct(logits, labels, (1, 5))
    present = actual > 0
    return {
        "num_samples": int(len(labels_np)),
        "top1": 100.0 * correct[1] / total,
        "top5": 100.0 * correct[5] / total,
        "macro_f1": 100.0 * float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {c: {"precision": 100.0 * float(precision[i]), "recall": 100.0 * float(recall[i]),
                          "f1": 100.0 * float(f1[i]), "support": int(actual[i])} for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }
