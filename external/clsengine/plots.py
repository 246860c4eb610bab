"""PNG plots: confusion matrix, training curves, reliability diagram (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_output  # noqa: E402


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: list[str], path: str | os.PathLike) -> Path:
    cm = np.asarray(cm)
    n = len(classes)
    size = min(20.0, 2.0 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    row_sums = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)
    ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=classes, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (counts; colour = row-normalised)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if normalised[i, j] > 0.5 else "black")
    return save_figure(fig, path)


def plot_reliability(curves: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> Path:
    """Reliability diagram: per confidence bin, accuracy against mean confidence (the diagonal is perfect
    calibration), one curve per entry of `curves` (e.g. "before" and "after" calibration; the bins of
    clsengine.calibration.reliability), with each bin's share of the images below."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    width = 1.0 / max(1, len(next(iter(curves.values()), [])))
    for n, (name, bins) in enumerate(curves.items()):
        used = [b for b in bins if b["count"] > 0]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", label=name)
        total = sum(b["count"] for b in bins) or 1
        offset = (n - (len(curves) - 1) / 2) * width / max(1, len(curves))
        counts.bar([(b["low"] + b["high"]) / 2 + offset for b in bins], [b["count"] / total for b in bins],
                   width=width / max(1, len(curves)), label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(title or "Reliability diagram")
    ax.legend(loc="upper left")
    counts.set_xlabel("confidence")
    counts.set_ylabel("share of images")
    return save_figure(fig, path)


def plot_training_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """Loss, validation top-1 (or mAP) and learning rate per epoch, from the rows of the epoch CSV."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [row["train_loss"] for row in history], marker="o")
    axes[0].set_title("train loss")
    curves = (("val_top1", "top-1", "o"), ("val_top5", "top-5", "."), ("val_map", "mAP", "o"),
              ("ema_val_top1", "EMA top-1", "x"), ("ema_val_map", "EMA mAP", "x"))
    for key, label, marker in curves:
        if any(row.get(key, "") not in ("", None) for row in history):
            axes[1].plot(epochs, [float(row[key]) if row.get(key, "") not in ("", None) else float("nan")
                                  for row in history], marker=marker, label=label)
    axes[1].set_title("validation top-k accuracy / mAP (%)")
    axes[1].legend()
    axes[2].plot(epochs, [row["lr"] for row in history], marker="o")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a figure atomically (a PNG is never half-written) and close it; the format follows the suffix."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
