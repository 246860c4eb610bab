"""The training checkpoint, assembled in one place: latest.pth after every epoch, best.pth when the score
improves, and what a resumed run reads back. Every writer (the training loop, compression's PTQ model) builds
the dict with `checkpoint_state`; `CheckpointSaver` adds the bookkeeping of the best epoch."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .errors import UserError
from .optim.scheduler import LRSchedule
from .recipe import Recipe


@dataclass
class ResumableState:
    """What a checkpoint needs beyond the weights for training to continue where it stopped."""
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    recipe: Recipe
    history: list[dict] = field(default_factory=list)


def checkpoint_state(model: nn.Module, *, epoch: int, score: float, best_score: float, best_epoch: int,
                     extra: dict[str, Any], weights_from: str = "model", best_from: str | None = None,
                     resumable: ResumableState | None = None, best_loss: float | None = None) -> dict[str, Any]:
    """The one checkpoint dict (plain types and tensors, loadable with weights_only=True). `score` and
    `best_score` are the run's validation score: top-1, or mAP for a multi-label model. `resumable` adds
    what --resume-from continues with (optimizer, scheduler, EMA, auxiliary models, grad scaler, history,
    RNG state); `best_loss`, the best epoch's validation loss where it decides (CheckpointSaver's loss_guard)."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "weights_from": weights_from,
             "epoch": epoch, "score": score, "best_score": best_score, "best_epoch": best_epoch}
    if best_loss is not None:
        state["best_loss"] = best_loss
    if resumable is not None:
        recipe = resumable.recipe
        state.update(optimizer=resumable.optimizer.state_dict(), scheduler=resumable.scheduler.state_dict(),
                     best_from=best_from, history=resumable.history, rng=rng_state())
        if recipe.aux_models:
            state["aux_models"] = [aux.state_dict() for aux in recipe.aux_models]
        if recipe.ema is not None:
            state["ema"] = recipe.ema.state_dict()
        if recipe.grad_scaler is not None:
            state["grad_scaler"] = recipe.grad_scaler.state_dict()
    return {**state, **extra}


def checkpoint_score(checkpoint: dict[str, Any], best: bool = False) -> float:
    """The epoch's (or with `best`, the run's best) score; checkpoints written before the keys were renamed
    held them as val_top1 / best_top1."""
    key, old_key = ("best_score", "best_top1") if best else ("score", "val_top1")
    return float(checkpoint[key] if key in checkpoint else checkpoint[old_key])


def restore_training_state(checkpoint: dict[str, Any], model: nn.Module, resumable: ResumableState) -> None:
    """Load what checkpoint_state(resumable=...) wrote back into the run's objects, RNG state included."""
    model.load_state_dict(checkpoint["model"])
    resumable.optimizer.load_state_dict(checkpoint["optimizer"])
    resumable.scheduler.load_state_dict(checkpoint["scheduler"])
    recipe = resumable.recipe
    for aux, state in zip(recipe.aux_models, checkpoint.get("aux_models", [])):
        aux.load_state_dict(state)
    if recipe.ema is not None and "ema" in checkpoint:
        recipe.ema.load_state_dict(checkpoint["ema"])
    if recipe.grad_scaler is not None and "grad_scaler" in checkpoint:
        recipe.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    set_rng_state(checkpoint["rng"])


# What only --resume-from needs: best.pth (for eval, export, compression, fine-tuning from its weights) goes
# without them, a third of latest.pth's size with SGD's momentum, less still with AdamW or mutual learning.
RESUME_ONLY_KEYS = ("optimizer", "scheduler", "rng", "aux_models", "ema", "grad_scaler")


def best_from_latest(state: dict[str, Any]) -> dict[str, Any]:
    """best.pth's content from the latest.pth of the epoch that was the best: the model's weights or, where
    the EMA scored higher (`best_from`), the average's; no optimizer, EMA or auxiliary models (RESUME_ONLY_KEYS)."""
    best = {key: value for key, value in state.items() if key not in RESUME_ONLY_KEYS}
    if state.get("best_from") == "ema":
        best["model"] = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        best["weights_from"] = "ema"
    return best


def require_resumable(checkpoint: dict[str, Any], path: str | Path) -> None:
    """One error line for --resume-from given a checkpoint that holds no training state (a best.pth)."""
    if "optimizer" not in checkpoint:
        raise UserError(f"{path} holds the best epoch's weights, not a training state to continue: resume from "
                        f"latest.pth of the same folder, or start from these weights with --load-weights")


def repair_best(latest: dict[str, Any], best_path: Path, logger: logging.Logger) -> None:
    """Make best.pth agree with the latest.pth a run resumes from. A kill after latest.pth of an improving
    epoch was written and before best.pth was leaves best.pth missing or one best epoch behind: it is
    rebuilt from latest.pth. A best.pth of a later epoch (the epoch being redone) is left for it to replace."""
    epoch, best_epoch = int(latest["epoch"]), int(latest["best_epoch"])
    found = None
    if best_path.is_file():
        try:
            found = int(load_checkpoint(best_path).get("epoch", -1))
        except UserError:
            found = None  # unreadable: rebuilt below if it can be
    if found is not None and found >= best_epoch:
        return
    if best_epoch == epoch and latest.get("best_from") is not None:
        save_checkpoint(best_from_latest(latest), best_path)
        logger.warning(f"{best_path} was {'of epoch ' + str(found) if found is not None else 'missing'}; "
                       f"rebuilt from latest.pth (epoch {epoch}, the best so far)")
    else:
        logger.warning(f"{best_path} of the best epoch {best_epoch} is "
                       f"{'missing' if found is None else 'replaced by epoch ' + str(found)} and cannot be "
                       f"rebuilt from latest.pth (epoch {epoch}); it is written again at the next best epoch")


class CheckpointSaver:
    """Tracks the best epoch and writes latest.pth / best.pth into `output_dir` (when `write`; a search trial
    or a non-main rank only tracks). `extra` (class names, effective config...) goes into every checkpoint.
    With `loss_guard` an epoch is the best only with a higher score and a validation loss no higher than the
    best's (FitConfig.score_start)."""

    def __init__(self, output_dir: Path, extra: dict[str, Any], write: bool, logger: logging.Logger,
                 loss_guard: bool = False):
        self.output_dir, self.extra, self.write, self.logger = Path(output_dir), extra, write, logger
        self.best_score, self.best_epoch, self.best_loss = -1.0, 0, math.inf
        self.loss_guard = loss_guard

    def resume(self, checkpoint: dict[str, Any], model: nn.Module, resumable: ResumableState) -> int:
        """Restore a latest.pth into the run's objects; returns the epochs it had done. best.pth is repaired
        first if a kill left it behind (repair_best)."""
        restore_training_state(checkpoint, model, resumable)
        done = int(checkpoint["epoch"])
        self.best_score, self.best_epoch = checkpoint_score(checkpoint, best=True), int(checkpoint["best_epoch"])
        self.best_loss = float(checkpoint.get("best_loss", math.inf))  # older checkpoints: no guard yet
        resumable.history[:] = list(checkpoint.get("history", []))
        self.logger.info(f"Resuming after epoch {done} (best score {self.best_score:.2f} at epoch {self.best_epoch})")
        if self.write:
            repair_best(checkpoint, self.output_dir / "best.pth", self.logger)
        return done

    def save(self, model: nn.Module, epoch: int, score: float, scored_by: str, resumable: ResumableState,
             loss: float = math.inf) -> bool:
        """Record epoch `epoch` (1-based) scored `score` by `scored_by` ("model" or "ema"), whose validation
        loss is `loss`; returns whether it is the best so far. latest.pth is written first: a kill between the
        two writes leaves a latest.pth of the best epoch, from which resuming rebuilds best.pth."""
        improved = score > self.best_score and (not self.loss_guard or loss <= self.best_loss)
        if improved:
            self.best_score, self.best_epoch, self.best_loss = score, epoch, loss
        if self.write:
            state = checkpoint_state(model, epoch=epoch, score=score, best_score=self.best_score,
                                     best_epoch=self.best_epoch, extra=self.extra, resumable=resumable,
                                     best_from=scored_by if improved else None,
                                     best_loss=self.best_loss if self.loss_guard else None)
            save_checkpoint(state, self.output_dir / "latest.pth")
            if improved:
                save_checkpoint(best_from_latest(state), self.output_dir / "best.pth")
        return improved


__all__ = ["RESUME_ONLY_KEYS", "CheckpointSaver", "ResumableState", "best_from_latest", "checkpoint_score",
           "checkpoint_state", "repair_best", "require_resumable", "restore_training_state"]
