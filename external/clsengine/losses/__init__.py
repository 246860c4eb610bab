"""Classification losses, created by name."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from .am_softmax import AMSoftmaxLoss
from .asl import AsymmetricLoss, BinaryCrossEntropyLoss

LOSSES = ("softmax", "am_softmax", "bce", "asl")
MULTILABEL_LOSSES = ("bce", "asl")  # take (N, C) multi-hot targets instead of class indices


def create_loss(name: str, *, label_smoothing: float = 0.0, scale: float | None = None, margin: float = 0.35,
                margin_type: str = "cos", weight: torch.Tensor | None = None, asl_gamma_neg: float = 4.0,
                asl_gamma_pos: float = 0.0, asl_clip: float = 0.05) -> nn.Module:
    """`scale`, `margin` and `margin_type` apply to am_softmax only; its `scale` must match the
    model's CosineLinear, so it has no default here. `weight` holds one value per class (see
    data.class_weights); the asl_* settings apply to asl only."""
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32)
    if name == "softmax":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "am_softmax":
        if scale is None:
            raise UserError("loss 'am_softmax' needs the cosine classifier's scale (see am_softmax_scale)")
        return AMSoftmaxLoss(scale, margin=margin, margin_type=margin_type, label_smoothing=label_smoothing,
                             weight=weight)
    if name == "bce":
        return BinaryCrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "asl":
        return AsymmetricLoss(gamma_neg=asl_gamma_neg, gamma_pos=asl_gamma_pos, clip=asl_clip, weight=weight,
                              label_smoothing=label_smoothing)
    raise UserError(f"unknown loss '{name}'; known: {', '.join(LOSSES)}")


__all__ = ["AMSoftmaxLoss", "AsymmetricLoss", "BinaryCrossEntropyLoss", "LOSSES", "MULTILABEL_LOSSES",
           "create_loss"]
