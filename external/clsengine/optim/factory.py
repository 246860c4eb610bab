"""create_optimizer: SGD, ASGD, Adam, AdamW over parameter groups with optional no-bias-decay."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from .sam import SAM

OPTIMIZERS = ("sgd", "asgd", "adam", "adamw")


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool) -> list[dict]:
    """Trainable parameters; with no_bias_decay, biases and 1-d norm weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_bias_decay and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def create_optimizer(model: nn.Module | list[nn.Module], name: str, lr: float, *, momentum: float = 0.9,
                     weight_decay: float = 0.0, nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                     no_bias_decay: bool = False, sam_rho: float | None = None,
                     sam_adaptive: bool = False) -> torch.optim.Optimizer:
    """One optimizer over the trainable parameters of `model` (or of several models trained together).

    With `sam_rho` the optimizer is wrapped in SAM, which takes two forward/backward passes per step.
    """
    models = model if isinstance(model, (list, tuple)) else [model]
    groups = [g for m in models for g in param_groups(m, weight_decay, no_bias_decay)]
    if not groups:
        raise UserError("the model has no trainable parameters (is everything frozen?)")
    name = name.lower()
    if name == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": momentum, "nesterov": nesterov and momentum > 0}
    elif name == "asgd":
        cls, kwargs = torch.optim.ASGD, {}
    elif name == "adam":
        cls, kwargs = torch.optim.Adam, {"betas": betas}
    elif name == "adamw":
        cls, kwargs = torch.optim.AdamW, {"betas": betas}
    else:
        raise UserError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
    if sam_rho is not None:
        return SAM(groups, cls, rho=sam_rho, adaptive=sam_adaptive, lr=lr, **kwargs)
    return cls(groups, lr=lr, **kwargs)
