"""Counter-measures for class imbalance: per-class loss weights and per-sample weights for a
class-balanced sampler."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UserError

CLASS_WEIGHT_MODES = ("none", "auto")


def class_weights(counts: Sequence[int], mode: str | Sequence[float]) -> torch.Tensor | None:
    """Per-class loss weights (float32), or None for an unweighted loss.

    "auto": inverse frequency total / (C_present * n_c), so a balanced dataset gets all ones and the
    weighted mean over the training images keeps the loss's scale; a class without images gets 1.0.
    A list gives the weights explicitly, one per class.
    """
    if mode is None:
        return None
    if isinstance(mode, str):
        key = mode.strip().lower()
        if key == "none":
            return None
        if key == "auto":
            counts = np.asarray(counts, dtype=np.float64)
            present = counts > 0
            weights = np.ones(len(counts))
            if present.any():
                weights[present] = counts.sum() / (present.sum() * counts[present])
            return torch.tensor(weights, dtype=torch.float32)
        raise UserError(f"class weights: unknown mode '{mode}'; use \"none\", \"auto\" or a list of numbers, "
                        f"one per class")
    try:
        values = np.asarray(mode.tolist() if isinstance(mode, torch.Tensor) else list(mode), dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"class weights: {mode!r} is not \"none\", \"auto\" or a list of numbers") from None
    if values.ndim != 1 or len(values) != len(counts):
        given = values.size if values.ndim else 1
        raise UserError(f"class weights: {given} values given for {len(counts)} classes")
    if not np.isfinite(values).all():
        raise UserError(f"class weights: every value must be a finite number, got {values.tolist()}")
    if (values < 0).any():
        raise UserError(f"class weights: values must be >= 0, got {values.tolist()}")
    if not (values > 0).any():
        raise UserError("class weights: all values are 0, which would switch the loss off")
    return torch.tensor(values, dtype=torch.float32)


def sample_weights(samples: Sequence[tuple[str, int | tuple[int, ...]]], counts: Sequence[int]) -> list[float]:
    """Sampling weight per sample for a class-balanced sampler: 1 / count of its class, so every
    class is drawn about equally often. A multi-label sample takes its rarest label's weight; one
    without labels weighs as much as an image of the most common class."""
    counts = list(counts)
    if not counts or max(counts) <= 0:
        raise UserError("sample weights: no class has any image")
    fallback = 1.0 / max(counts)
    out = []
    for path, label in samples:
        labels = tuple(label) if isinstance(label, (tuple, list)) else (label,)
        weight = 0.0
        for index in labels:
            index = int(index)
            if not 0 <= index < len(counts) or counts[index] <= 0:
                count = counts[index] if 0 <= index < len(counts) else "no"
                raise UserError(f"sample weights: {path} has label {index}, but the counts give {count} images "
                                f"for it ({len(counts)} classes)")
            weight = max(weight, 1.0 / counts[index])
        out.append(weight if labels else fallback)
    return out


def check_sample_weights(weights: Sequence[float], num_samples: int) -> list[float]:
    """The weights as floats, or a UserError if they cannot drive a sampler over `num_samples` samples."""
    if num_samples == 0:
        raise UserError("sample weights: the dataset is empty")
    weights = [float(w) for w in weights]
    if len(weights) != num_samples:
        raise UserError(f"sample weights: {len(weights)} weights given for a dataset of {num_samples} samples")
    bad = next((w for w in weights if not math.isfinite(w) or w < 0), None)
    if bad is not None:
        raise UserError(f"sample weights must be finite and >= 0, got {bad}")
    if not any(w > 0 for w in weights):
        raise UserError("sample weights are all 0: no sample could be drawn")
    return weights


__all__ = ["CLASS_WEIGHT_MODES", "class_weights", "sample_weights"]
