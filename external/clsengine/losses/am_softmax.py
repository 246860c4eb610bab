"""Additive angular-margin softmax loss (AM-Softmax / CosFace and ArcFace) for cosine classifiers."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

MARGIN_TYPES = ("cos", "arc")
_EPS = 1e-6  # keeps acos away from +-1, where its gradient is infinite


class AMSoftmaxLoss(nn.Module):
    """Cross-entropy after penalising the target class by a margin, so classes must be separated by
    an angle rather than merely ranked; that yields more compact, better-separated features.

    Expects the logits of a CosineLinear with the same `scale` (logits = scale * cos(theta)).
    margin_type "cos": target logit scale * (cos(theta) - m).
    margin_type "arc": target logit scale * cos(theta + m) while theta + m < pi; beyond that
    cos(theta + m) would rise again, so it falls back to ArcFace's scale * (cos(theta) - m * sin(m)),
    which keeps the target logit decreasing in theta and always below the unpenalised one.
    """

    def __init__(self, scale: float, margin: float = 0.35, margin_type: str = "cos",
                 label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if margin_type not in MARGIN_TYPES:
            raise UserError(f"unknown margin type '{margin_type}'; known: {', '.join(MARGIN_TYPES)}")
        if margin < 0:
            raise UserError(f"margin must be >= 0, got {margin}")
        if scale <= 0:
            raise UserError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.margin_type = margin_type
        self.label_smoothing = float(label_smoothing)
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
            if weight.dim() != 1:
                raise UserError(f"class weights must be one value per class, got shape {tuple(weight.shape)}")
        self.register_buffer("weight", weight)  # per-class weights of the cross-entropy, or None

    def _penalised(self, cos: torch.Tensor) -> torch.Tensor:
        m = self.margin
        if self.margin_type == "cos":
            return cos - m
        theta = torch.acos(cos.clamp(-1.0 + _EPS, 1.0 - _EPS))
        return torch.where(cos > math.cos(math.pi - m), torch.cos(theta + m), cos - m * math.sin(m))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`target`: class indices, or (N, C) class probabilities (MixUp / CutMix), whose margin is each class's
        penalty weighted by its probability (the same loss for one-hot targets)."""
        logits = logits.float()  # the margin arithmetic near cos = +-1 is too coarse in half precision
        if target.dim() == 2:
            cos = logits / self.scale
            modified = logits + target * self.scale * (self._penalised(cos) - cos)
        else:
            index = target.long().unsqueeze(1)
            target_cos = logits.gather(1, index) / self.scale
            modified = logits.scatter(1, index, self.scale * self._penalised(target_cos))
        weight = None if self.weight is None else self.weight.to(modified.device)
        return F.cross_entropy(modified, target, weight=weight, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"scale={self.scale:.4g}, margin={self.margin}, margin_type={self.margin_type}, "
                f"label_smoothing={self.label_smoothing}, weighted={self.weight is not None}")


__all__ = ["AMSoftmaxLoss", "MARGIN_TYPES"]
