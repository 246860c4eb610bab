"""BatchNorm running statistics that start from the data instead of from (mean 0, variance 1).

PyTorch's running statistics are an exponential average that starts at mean 0, variance 1: after n training
steps with momentum m, the initial variance of 1 still weighs (1 - m)^n. Deep in a freshly initialised
network the real variance of a layer's input is often 1e-4..1e-2, so until n is in the hundreds the
evaluation-mode network divides by a variance that is mostly that initial 1, every layer shrinks its output
further, and the logits end up constant: validation loss exactly ln C, whatever the training loss says.
Short runs on small datasets (a few optimizer steps per epoch) never get out of this (domain README, "Why short
runs used to predict one class").

The fix is the one PyTorch offers for the start of an average (momentum None: a cumulative average), used
while 1 / (n + 1) is larger than the momentum, then the momentum: the statistics are then always an average
of batch statistics, with no part of the initial values, and a long run is unchanged after its first
1/m steps. `warm_start(model)` marks a model's BatchNorm layers; `update_momentum(models)` before each
training step switches each layer to its momentum once it has seen enough batches (num_batches_tracked, so a
resumed run continues exactly).
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

DEFAULT_MOMENTUM = 0.1


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def warm_start(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of `model` average its first batches cumulatively (see the module doc)."""
    for bn in batchnorms(model):
        bn.target_momentum = bn.momentum if bn.momentum is not None else DEFAULT_MOMENTUM
        bn.momentum = None
    return model


def update_momentum(models: Iterable[nn.Module]) -> None:
    """Before a training step: the momentum of each warm-started layer is max(its momentum, 1 / (n + 1)).

    Only layers still in their cumulative start read their counter (a device read per step and layer for
    the first 1/m steps); once warmed up, a step costs a walk over the modules and no read.
    """
    for model in models:
        for bn in batchnorms(model):
            target = getattr(bn, "target_momentum", None)
            if target is not None and bn.momentum is None and (int(bn.num_batches_tracked) + 1) * target > 1:
                bn.momentum = target


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), except BatchNorm layers whose parameters are all frozen: they stay in evaluation mode and
    keep their running statistics (a frozen layer is frozen whole; on a few hundred images in batches of 16
    the batch statistics are noisier than ImageNet's)."""
    model.train()
    for bn in batchnorms(model):
        params = list(bn.parameters())
        if params and not any(p.requires_grad for p in params):
            bn.eval()
    return model


__all__ = ["batchnorms", "train_mode", "update_momentum", "warm_start"]
