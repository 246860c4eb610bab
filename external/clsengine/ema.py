"""Exponential moving average (EMA) of model weights, on top of torch.optim.swa_utils.AveragedModel.

Evaluating an average of recent weights instead of the last iterate smooths out SGD noise and usually
gives a slightly better, more stable model for free. BatchNorm running statistics are averaged as well
(``use_buffers=True``), so the EMA model can be evaluated directly, without a BN re-estimation pass;
integer buffers (``num_batches_tracked``) are copied, as averaging a counter is meaningless.

Decay warm-up: with ``decay=0.999`` the average has a memory of ~1000 updates, so for the first few
thousand updates it would still be dominated by the random initialisation the EMA copy started from.
With warm-up the effective decay is ``d_n = min(decay, (1 + n) / (10 + n))`` (n = updates so far):
0.1 at the first update, 0.5 after 8, reaching ``decay`` only later, so the average follows the model
closely while it moves fast and becomes a long average once training settles.

Usage, after every optimizer step:  ``ema.update_parameters(model)``; evaluate ``ema.module``;
checkpoint ``ema.state_dict()`` (it holds the update count, so a resumed run continues the same warm-up).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(n: int, decay: float, warmup: bool = True) -> float:
    """Effective decay of update number `n` (0-based): `decay`, capped by (1 + n) / (10 + n) with warm-up."""
    return min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay


class ModelEma(AveragedModel):
    """AveragedModel with EMA + decay warm-up; `.module` is the averaged nn.Module.

    Unlike plain AveragedModel, the first `update_parameters` does not overwrite the copy with the model:
    the copy taken at construction is the starting average (update 0 blends it with decay d_0).
    `n_averaged` (a buffer, so it is in `state_dict()`) is therefore 1 + the number of updates.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True,
                 device: torch.device | str | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(model, device=device, multi_avg_fn=self._average, use_buffers=True)
        self.decay = decay
        self.warmup = warmup
        self.n_averaged.fill_(1)  # the initial copy counts as the first averaged model
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.module.eval()  # never trained; evaluate it as-is

    @property
    def num_updates(self) -> int:
        return int(self.n_averaged) - 1

    @torch.no_grad()
    def _average(self, ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        # Called once per (device, dtype) group; all tensors in `ema` share a dtype.
        if not (torch.is_floating_point(ema[0]) or torch.is_complex(ema[0])):
            torch._foreach_copy_(ema, current)
            return
        d = ema_decay(int(n_averaged) - 1, self.decay, self.warmup)
        torch._foreach_lerp_(ema, current, 1.0 - d)


def create_ema(model: nn.Module, decay: float = 0.999, warmup: bool = True,
               device: torch.device | str | None = None) -> ModelEma:
    """An EMA copy of `model` (see ModelEma); `device` can keep it off the GPU to save memory."""
    return ModelEma(model, decay=decay, warmup=warmup, device=device)
