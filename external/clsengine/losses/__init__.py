"""Classification losses, created by name."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError

LOSSES = ("softmax",)


def create_loss(name: str, *, label_smoothing: float = 0.0) -> nn.Module:
    if name == "softmax":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    raise UserError(f"unknown loss '{name}'; known: {', '.join(LOSSES)}")


__all__ = ["LOSSES", "create_loss"]
