"""Cosine classifier head for AM-Softmax / ArcFace training."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError



def last_linear(module: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute name, layer) of the last nn.Linear inside `module`."""
    found = None
    for parent in module.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, attr, child)
    if found is None:
        raise UserError(f"no linear classifier found in {type(module).__name__}")
    return found

class CosineLinear(nn.Module):
    """Logits `scale * cos(theta)` between features and class weights: class scores depend on angle only,
    which is what the angular margin of AMSoftmaxLoss acts on."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        if scale <= 0:
            raise UserError(f"cosine classifier scale must be positive, got {scale}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # A buffer, not a parameter: saved with the weights and exported as a constant, never trained.
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={float(self.scale):.4g}"


def am_softmax_scale(num_classes: int) -> float:
    """The scale large enough for the softmax to reach high target probability with C classes,
    max(sqrt(2) * ln(C - 1), 3) (AdaCos' fixed scale, floored so few-class problems still train)."""
    if num_classes <= 2:
        return 3.0
    return max(math.sqrt(2.0) * math.log(num_classes - 1), 3.0)


def use_cosine_classifier(model: nn.Module, scale: float) -> nn.Module:
    """Replace the last nn.Linear of a create_model() classifier by a fresh CosineLinear (in place).

    Apply it before load_pretrained() when the weights file comes from a cosine model, since
    create_model(pretrained=...) would load the head weights into the Linear this replaces.
    """
    head_name = model.head_name
    head = getattr(model, head_name)
    if isinstance(head, nn.Linear):
        parent, attr, linear = model, head_name, head
    else:
        parent, attr, linear = last_linear(head)
    cosine = CosineLinear(linear.in_features, linear.out_features, scale)
    setattr(parent, attr, cosine.to(device=linear.weight.device, dtype=linear.weight.dtype))
    return model


__all__ = ["CosineLinear", "am_softmax_scale", "last_linear", "use_cosine_classifier"]
