"""create_optimizer: SGD, ASGD, Adam, AdamW over parameter groups with optional no-bias-decay."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError

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


def create_optimizer(model: nn.Module, name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                     nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                     no_bias_decay: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, no_bias_decay)
    if not groups:
        raise UserError("the model has no trainable parameters (is everything frozen?)")
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "asgd":
        return torch.optim.ASGD(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise UserError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
