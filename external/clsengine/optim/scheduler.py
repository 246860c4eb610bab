"""Linear warm-up followed by cosine annealing or reduce-on-plateau, in one small explicit scheduler.

The loop calls `step_iter()` after every optimizer step and `step_epoch(metric)` after validation.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UserError

SCHEDULERS = ("cosine", "plateau", "constant")


class LRSchedule:
    """The whole learning-rate schedule of a run: a linear warm-up, then cosine decay, plateau steps or a
    constant rate; the loop calls `step_iter()` after every optimizer step and `step_epoch(metric)` after
    validation."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, epochs: int, iters_per_epoch: int, *,
                 warmup_epochs: float = 0.0, warmup_factor: float = 0.1, min_lr: float = 0.0,
                 factor: float = 0.1, patience: int = 5, threshold: float = 1e-4,
                 force_decay_at: float | None = None):
        if name not in SCHEDULERS:
            raise UserError(f"unknown scheduler '{name}'; known: {', '.join(SCHEDULERS)}")
        self.optimizer = optimizer
        self.name = name
        self.epochs = max(1, epochs)
        self.iters_per_epoch = max(1, iters_per_epoch)
        self.warmup_iters = int(round(warmup_epochs * self.iters_per_epoch))
        self.warmup_factor = warmup_factor
        self.min_lr = min_lr
        self.factor, self.patience, self.threshold = factor, patience, threshold
        # Plateau: if the LR was never reduced by this fraction of the run, reduce it once anyway.
        self.force_decay_at = force_decay_at
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.iteration = 0
        self.epoch = 0
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0
        self.num_reductions = 0
        self._apply()

    def multiplier(self) -> float:
        if self.iteration < self.warmup_iters:
            t = self.iteration / self.warmup_iters
            return self.warmup_factor + (1.0 - self.warmup_factor) * t
        if self.name == "cosine":
            done = self.iteration - self.warmup_iters
            total = max(1, self.epochs * self.iters_per_epoch - self.warmup_iters)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done / total)))
        if self.name == "plateau":
            return self.plateau_scale
        return 1.0

    def lr_lowered(self) -> bool:
        """Whether the schedule has lowered the LR yet: reduce-on-plateau once at least, cosine past its midpoint
        (at most half its peak); a constant schedule always counts as lowered. What early stopping waits for."""
        if self.name == "plateau":
            return self.num_reductions > 0
        if self.name == "cosine":
            return self.iteration >= self.warmup_iters and self.multiplier() <= 0.5
        return True

    def _apply(self) -> None:
        m = self.multiplier()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = max(self.min_lr, base * m) if self.iteration >= self.warmup_iters else base * m

    def step_iter(self) -> None:
        self.iteration += 1
        self._apply()

    def step_epoch(self, metric: float | None = None) -> None:
        """End of an epoch; `metric` (higher is better) drives reduce-on-plateau."""
        self.epoch += 1
        if self.name == "plateau" and metric is not None and self.iteration >= self.warmup_iters:
            if self.best is None or metric > self.best + self.threshold:
                self.best, self.bad_epochs = metric, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.patience:
                    self._reduce()
            if (self.force_decay_at is not None and self.num_reductions == 0
                    and self.epoch >= self.force_decay_at * self.epochs):
                self._reduce()
        self._apply()

    def _reduce(self) -> None:
        self.plateau_scale *= self.factor
        self.num_reductions += 1
        self.bad_epochs = 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("iteration", "epoch", "plateau_scale", "best", "bad_epochs",
                                               "num_reductions", "base_lrs")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()


def create_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, iters_per_epoch: int,
                     **kwargs: Any) -> LRSchedule:
    return LRSchedule(optimizer, name, epochs, iters_per_epoch, **kwargs)
