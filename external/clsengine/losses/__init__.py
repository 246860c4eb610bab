"""Classification losses, created by name."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from .am_softmax import AMSoftmaxLoss

LOSSES = ("softmax", "am_softmax")


def create_loss(name: str, *, label_smoothing: float = 0.0, scale: float | None = None, margin: float = 0.35,
                margin_type: str = "cos") -> nn.Module:
    """`scale`, `margin` and `margin_type` apply to am_softmax only; its `scale` must match the
    model's CosineLinear, so it has no default here."""
    if name == "softmax":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if name == "am_softmax":
        if scale is None:
            raise UserError("loss 'am_softmax' needs the cosine classifier's scale (see am_softmax_scale)")
        return AMSoftmaxLoss(scale, margin=margin, margin_type=margin_type, label_smoothing=label_smoothing)
    raise UserError(f"unknown loss '{name}'; known: {', '.join(LOSSES)}")


__all__ = ["AMSoftmaxLoss", "LOSSES", "create_loss"]
