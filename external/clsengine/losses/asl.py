"""Multi-label losses on independent per-class sigmoids: binary cross-entropy and the asymmetric loss
(Ridnik et al. 2021, "Asymmetric Loss for Multi-Label Classification").

Both sum over classes and average over images, so the loss is per image and its size does not
shrink as the class count grows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

_EPS = 1e-8  # floor of the focusing weights' bases, whose gradient is infinite at 0 for exponents < 1


def _check_common(weight: torch.Tensor | None, label_smoothing: float) -> torch.Tensor | None:
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
    if weight.dim() != 1:
        raise UserError(f"class weights must be one value per class, got shape {tuple(weight.shape)}")
    return weight


def _prepare(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None,
             label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits and (smoothed) float targets, after checking the shapes."""
    if logits.dim() != 2 or tuple(targets.shape) != tuple(logits.shape):
        raise UserError(f"multi-label loss needs (N, C) logits and multi-hot targets of the same shape, got "
                        f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if weight is not None and weight.numel() != logits.shape[1]:
        raise UserError(f"{weight.numel()} class weights for {logits.shape[1]} classes")
    targets = targets.to(device=logits.device, dtype=torch.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / 2
    return logits.float(), targets


def _reduce(per_element: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        per_element = per_element * weight.to(per_element.device)  # also when the loss was not moved
    return per_element.sum(dim=1).mean()


class BinaryCrossEntropyLoss(nn.Module):
    """Sigmoid binary cross-entropy per class; optional per-class `weight` and label smoothing
    (y -> y(1 - eps) + eps/2)."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", _check_common(weight, label_smoothing))
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = _prepare(logits, targets, self.weight, self.label_smoothing)
        return _reduce(F.binary_cross_entropy_with_logits(logits, targets, reduction="none"), self.weight)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, weighted={self.weight is not None}"


class AsymmetricLoss(nn.Module):
    """Focal-style loss that treats positives and negatives differently: most labels of a multi-label
    image are easy negatives, which would otherwise dominate the gradient.

    loss = -[y (1-p)^gamma_pos log p + (1-y) p_m^gamma_neg log(1 - p_m)], p = sigmoid(logit),
    p_m = max(p - clip, 0): negatives below `clip` are discarded entirely, the rest down-weighted by
    gamma_neg. The logs are taken as log-sigmoids, exact and finite for any logit (the paper clamps
    them at eps instead). With gamma_neg = gamma_pos = clip = 0 this is BinaryCrossEntropyLoss.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise UserError(f"ASL gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
        if not 0.0 <= clip < 1.0:
            raise UserError(f"ASL clip must be in [0, 1), got {clip}")
        self.register_buffer("weight", _check_common(weight, label_smoothing))
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, y = _prepare(logits, targets, self.weight, self.label_smoothing)
        log_p = F.logsigmoid(logits)
        one_minus_p = torch.sigmoid(-logits)  # accurate where p is close to 1
        if self.clip > 0:
            # 1 - p_m = min(1 - p + clip, 1) >= clip, so its log needs no floor
            log_not_pm = torch.log((one_minus_p + self.clip).clamp(max=1.0))
            p_m = (torch.sigmoid(logits) - self.clip).clamp(min=0.0)
        else:
            log_not_pm = F.logsigmoid(-logits)
            p_m = torch.sigmoid(logits)
        positive = y * log_p
        negative = (1.0 - y) * log_not_pm
        if self.gamma_pos > 0:
            positive = positive * one_minus_p.clamp(min=_EPS).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            negative = negative * p_m.clamp(min=_EPS).pow(self.gamma_neg)
        return _reduce(-(positive + negative), self.weight)

    def extra_repr(self) -> str:
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
                f"label_smoothing={self.label_smoothing}, weighted={self.weight is not None}")


__all__ = ["AsymmetricLoss", "BinaryCrossEntropyLoss"]
