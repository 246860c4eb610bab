"""The training loop: forward, loss, backward, step, schedule, validate, checkpoint. Read it top to bottom."""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from . import distributed as dist
from .checkpoint_saver import CheckpointSaver, ResumableState
from .errors import UserError
from .losses.mutual import mutual_losses
from .metrics import primary_score, topk_accuracy
from .models.batchnorm import batchnorms, train_mode, update_momentum as update_bn_momentum
from .optim.sam import SAM
from .optim.scheduler import LRSchedule
from .recipe import Recipe
from .runlog import RunLog
from .utils import autocast


# A batch loss this many times the run's first one (taken as at least 1) means the run diverged: a healthy run's
# loss falls from its start; a learning rate far too high sends it up by orders of magnitude within an epoch.
DIVERGENCE_FACTOR = 1e3


class Diverged(UserError):
    """The training or validation loss became non-finite or grew by orders of magnitude."""


@dataclass
class DivergenceGuard:
    """Stops a diverging run at the batch where it shows, instead of after epochs of a meaningless loss."""
    factor: float = DIVERGENCE_FACTOR
    reference: float | None = None   # the run's first finite batch loss (at least 1)

    def check(self, loss: float, lr: float, where: str) -> None:
        if self.reference is None and math.isfinite(loss):
            self.reference = max(loss, 1.0)
        elif not math.isfinite(loss) or loss > self.factor * self.reference:
            start = f" (it began at {self.reference:.3g})" if self.reference is not None else ""
            raise Diverged(f"training diverged in {where}: the loss reached {loss:.3g}{start} at learning rate "
                           f"{lr:.3g}")

    def check_validation(self, loss: float, lr: float, epoch: int) -> None:
        if not math.isfinite(loss):
            raise Diverged(f"training diverged in epoch {epoch}: the validation loss is {loss} at learning rate "
                           f"{lr:.3g}")


@dataclass
class FitConfig:
    epochs: int
    output_dir: Path
    early_stopping_patience: int | None = None   # epochs without a better val top-1 before stopping
    tensorboard_dir: Path | None = None
    max_grad_norm: float | None = None
    progress: bool = True
    # What best.pth judges (default: val top-1 of the model or its EMA), e.g. the top-1 of the model as
    # deployed: compression scores the exported int8 file, not the PyTorch simulation.
    score_fn: Callable[[nn.Module], float] | None = None
    # Stored verbatim in every checkpoint (class names, effective config...): plain Python types only.
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    checkpoints: bool = True                     # write latest.pth / best.pth (off for search trials)
    deadline: float | None = None                # time.monotonic() by which training ends (a time budget)
    # With a deadline: called after each epoch (validated and saved) with (epochs done, mean seconds per epoch of
    # this run so far); returns the number of epochs the run should have in all, which the loop and the
    # schedule then follow.
    replan: Callable[[int, float], int] | None = None
    # Validate the model before the first epoch and keep it as epoch 0: best.pth until an epoch beats it (a
    # fine-tuning that starts from a fitted head must not end below where it started). An epoch then beats the
    # best only with a higher score and a validation loss no higher: on a validation set of a hundred images
    # a score one image higher is noise, and an early epoch that wins it with a worse loss lost test images.
    score_start: bool = False


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> tqdm:
    """A bar with rate and ETA; redrawn rarely when stderr is a log file rather than a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, unit="batch")


@contextmanager
def _frozen_bn_stats(models: list[nn.Module]):
    """Keep BatchNorm running statistics as they are (SAM's second pass sees the same batch again)."""
    saved = [(m, [b.clone() for b in m.buffers(recurse=False)]) for model in models for m in batchnorms(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for buffer, value in zip(m.buffers(recurse=False), buffers):
                    buffer.copy_(value)


def _losses(models: list[nn.Module], criteria: list[nn.Module], images: torch.Tensor, labels: torch.Tensor,
            recipe: Recipe, mutual_weight: float) -> list[torch.Tensor]:
    """One loss per model: its own criterion plus, with mutual learning, the weighted KL to the others; the main
    model's also the weighted KL to a fixed teacher (recipe.teacher: distillation, the one-directional case)."""
    teacher = recipe.teacher if recipe.teacher is not None and recipe.teacher.weight > 0 else None
    with autocast(images.device.type, recipe.amp_dtype):
        logits = [m(images) for m in models]
        target = teacher.logits(images) if teacher is not None else None
    losses = [criterion(x.float(), labels) for criterion, x in zip(criteria, logits)]
    if teacher is not None:
        losses[0] = losses[0] + teacher.loss(logits[0], target)
    if mutual_weight > 0:
        losses = [loss + mutual_weight * kl
                  for loss, kl in zip(losses, mutual_losses(logits, recipe.mutual_temperature, recipe.multilabel))]
    return losses


def _with_what_was_kept(exc: Diverged, saver: CheckpointSaver) -> Diverged:
    kept = ("no epoch finished before it, so no checkpoint of this run was written" if saver.best_score < 0
            else f"best.pth keeps {f'epoch {saver.best_epoch}' if saver.best_epoch else 'the starting model'} "
                 f"(score {saver.best_score:.2f})")
    return Diverged(f"{exc}; lower the learning rate (a tenth is a good next try); {kept}")


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRSchedule, device: torch.device, desc: str = "train",
                    max_grad_norm: float | None = None, progress: bool = True, recipe: Recipe | None = None,
                    epoch: int = 0, forward_models: list[nn.Module] | None = None,
                    guard: DivergenceGuard | None = None) -> dict[str, float]:
    """One pass over `loader`. With a SAM optimizer every step takes two forward/backward passes. `guard`
    (the run's) raises Diverged when the loss explodes (default: one for this epoch).

    `forward_models` (the model and auxiliary models wrapped in DistributedDataParallel) run the forward
    passes in a distributed run, so that gradients are averaged over the ranks.
    """
    recipe = recipe or Recipe()
    guard = guard if guard is not None else DivergenceGuard()
    models = [model, *recipe.aux_models]
    forward = forward_models or models
    criteria = [criterion, *recipe.aux_criteria]
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    mutual_weight = recipe.mutual_weight_at(epoch)
    sam = isinstance(optimizer, SAM)
    scaler = recipe.grad_scaler
    for m in models:
        train_mode(m)  # frozen BatchNorm layers stay in evaluation mode

    def backward(total: torch.Tensor) -> None:
        if scaler is not None:
            scaler.scale(total).backward()
            if max_grad_norm:
                scaler.unscale_(optimizer)
        else:
            total.backward()
        if max_grad_norm:
            nn.utils.clip_grad_norm_(params, max_grad_norm)

    total_loss, seen = 0.0, 0
    start = time.perf_counter()
    bar = _progress(loader, len(loader), desc, progress)
    for images, labels in bar:
        images = images.to(device, non_blocking=True, memory_format=recipe.memory_format)
        labels = labels.to(device, non_blocking=True)
        if recipe.mix is not None:
            images, labels = recipe.mix(images, labels)
        update_bn_momentum(models)
        losses = _losses(forward, criteria, images, labels, recipe, mutual_weight)
        main_loss = losses[0].item()
        guard.check(main_loss, scheduler.lr, desc)
        backward(sum(losses))
        if sam:
            optimizer.first_step(zero_grad=True)
            with _frozen_bn_stats(models):
                backward(sum(_losses(forward, criteria, images, labels, recipe, mutual_weight)))
            optimizer.second_step(zero_grad=True)
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step_iter()
        if recipe.ema is not None:
            recipe.ema.update_parameters(model)
        total_loss += main_loss * images.shape[0]
        seen += images.shape[0]
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{scheduler.lr:.3g}", img_s=f"{seen / elapsed:.1f}",
                        refresh=False)
    elapsed = time.perf_counter() - start
    total_loss, seen = dist.all_sum(total_loss, seen)  # over every rank's shard
    return {"loss": total_loss / max(1, seen), "time_s": elapsed, "images_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def predict(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
            desc: str = "eval", progress: bool = True, memory_format: torch.memory_format = torch.contiguous_format,
            amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader, on the CPU. `model` may also be any callable from an image
    batch to logits, such as an exported model (clsengine.inference.ExportedClassifier). `memory_format` and
    `amp_dtype`: the batches' layout and the autocast dtype, as in training (the validation of a training
    run; timm validates under its training autocast too)."""
    if isinstance(model, nn.Module):
        model.eval()
    all_logits, all_labels = [], []
    for images, labels in _progress(loader, len(loader), desc, progress):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with autocast(images.device.type, amp_dtype):
            all_logits.append(model(images).float().cpu())
        all_labels.append(labels)
    # A distributed loader gives each rank a shard: every rank gets all of them, so metrics are whole.
    return dist.gather(torch.cat(all_logits)), dist.gather(torch.cat(all_labels))


def validate(model: nn.Module, loader, criterion: nn.Module, device: torch.device, progress: bool = True,
             memory_format: torch.memory_format = torch.contiguous_format,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Loss and top-1/top-5 (top-5 with more than 5 classes), or mAP when the loader yields multi-hot
    (multi-label) targets."""
    logits, labels = predict(model, loader, device, desc="val", progress=progress, memory_format=memory_format,
                             amp_dtype=amp_dtype)
    if any(b.device.type != "cpu" for b in criterion.buffers()):  # e.g. class weights on the GPU
        criterion = copy.deepcopy(criterion).cpu()
    stats = {"loss": float(criterion(logits, labels))}
    if labels.dim() == 2:
        stats["mAP"] = primary_score(logits, labels)
    else:
        stats.update(topk_accuracy(logits, labels))
    return stats


def score_key(stats: dict[str, float]) -> str:
    """The key that ranks epochs: top-1, or mAP for multi-label."""
    return "mAP" if "mAP" in stats else "top1"


def _metrics_text(stats: dict[str, float]) -> str:
    if "mAP" in stats:
        return f"mAP {stats['mAP']:6.2f}"
    return f"top-1 {stats['top1']:6.2f}" + (f"  top-5 {stats['top5']:6.2f}" if "top5" in stats else "")


@dataclass
class EpochScore:
    """An epoch's validation: the model's stats, its EMA's (if any), and the score that ranks the epoch,
    taken from whichever of the two is better (`scored_by`)."""
    val: dict[str, float]
    ema: dict[str, float] | None
    score: float
    scored_by: str  # "model" or "ema"

    @property
    def loss(self) -> float:
        """The validation loss of the model that scored (the model's or its EMA's)."""
        return float((self.ema if self.scored_by == "ema" and self.ema is not None else self.val)["loss"])


def evaluate(model: nn.Module, recipe: Recipe, loader, criterion: nn.Module, device: torch.device,
             progress: bool = True) -> EpochScore:
    """Validate the model and its EMA (recipe.ema, a torch AveragedModel) in the training's memory layout and
    autocast, and score the epoch by the better of them."""
    run = dict(progress=progress, memory_format=recipe.memory_format, amp_dtype=recipe.amp_dtype)
    val_stats = validate(model, loader, criterion, device, **run)
    ema_stats = validate(recipe.ema.module, loader, criterion, device, **run) if recipe.ema is not None else None
    key = score_key(val_stats)
    if ema_stats is not None and ema_stats[key] > val_stats[key]:
        return EpochScore(val_stats, ema_stats, ema_stats[key], "ema")
    return EpochScore(val_stats, ema_stats, val_stats[key], "model")


def _history_row(epoch: int, train_stats: dict[str, float], result: EpochScore, lr: float) -> dict[str, Any]:
    val, ema = result.val, result.ema
    key = score_key(val)
    return {"epoch": epoch, "train_loss": train_stats["loss"], "val_loss": val["loss"],
            "val_top1": val.get("top1", ""), "val_top5": val.get("top5", ""), "val_map": val.get("mAP", ""),
            f"ema_val_{key.lower()}": ema[key] if ema else "", "lr": lr,
            "epoch_time_s": train_stats["time_s"], "images_per_s": train_stats["images_per_s"]}


def _epoch_line(epoch: int, epochs: int, train_stats: dict[str, float], result: EpochScore, lr: float,
                custom_score: bool, improved: bool) -> str:
    """The one-line summary of an epoch."""
    val, ema = result.val, result.ema
    key = score_key(val)
    ema_text = f"  EMA {'top-1' if key == 'top1' else key} {ema[key]:6.2f}" if ema else ""
    return (f"epoch {epoch:3d}/{epochs}  loss {train_stats['loss']:.4f}  val loss {val['loss']:.4f}  "
            f"{_metrics_text(val)}{ema_text}" + (f"  score {result.score:6.2f}" if custom_score else "")
            + f"  lr {lr:.3g}  {train_stats['time_s']:.1f}s  {train_stats['images_per_s']:.0f} img/s"
            + ("  *best*" if improved else ""))


def _training_forwards(model: nn.Module, recipe: Recipe) -> list[nn.Module] | None:
    """The modules the training steps call: wrapped in DistributedDataParallel in a distributed run (so that
    gradients are averaged over the ranks) and compiled with recipe.compile (on the first step); None: the
    plain models. Validation and the weights stay with the plain modules."""
    models = [model, *recipe.aux_models]
    forwards = [dist.wrap(m) for m in models] if dist.info().enabled else None
    if recipe.compile:
        forwards = [torch.compile(m) for m in forwards or models]
    return forwards


def fit(model: nn.Module, train_loader, val_loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: LRSchedule, device: torch.device, cfg: FitConfig, logger: logging.Logger,
        resume: dict[str, Any] | None = None, on_epoch_end: Callable[[int, dict], bool | None] | None = None,
        recipe: Recipe | None = None) -> dict[str, Any]:
    """Train for cfg.epochs, validating each epoch; write latest.pth every epoch and best.pth on improvement.

    With an EMA, both the model and its average are validated and best.pth carries the better weights
    (`weights_from` says which). `resume` is a checkpoint dict written by this function: training
    continues after its epoch with the optimizer, scheduler, EMA, auxiliary models, RNG state, history
    and best score it holds. `on_epoch_end(epoch, row)` sees each epoch's history row (with its "score")
    after the checkpoints are written; returning True stops the run there (compression's accuracy budget
    reached; a search trial is pruned by raising instead).
    """
    recipe = recipe or Recipe()
    main = dist.info().is_main  # only rank 0 writes checkpoints, logs and curves
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(output_dir, cfg.checkpoint_extra, write=main and cfg.checkpoints, logger=logger,
                            loss_guard=cfg.score_start)
    state = ResumableState(optimizer, scheduler, recipe)
    start_epoch = saver.resume(resume, model, state) if resume is not None else 0
    runlog = RunLog(output_dir, cfg.tensorboard_dir if main else None, state.history, write=main)
    state.history = runlog.history  # the rows the checkpoints carry
    forward_models = _training_forwards(model, recipe)
    progress = cfg.progress and main

    if cfg.score_start and resume is None:
        _score_start(model, recipe, val_loader, criterion, device, cfg, saver, state, logger, progress)
    stop = None  # why the run ended before its last epoch
    epochs, epoch = cfg.epochs, start_epoch
    loop_started = time.monotonic()
    guard = DivergenceGuard()
    try:
        while epoch < epochs and stop is None:
            epoch += 1  # 1-based from here on
            epoch_started = time.monotonic()
            for loader in (train_loader, val_loader):
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch - 1)
            train_stats = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                                          desc=f"epoch {epoch}/{epochs}", max_grad_norm=cfg.max_grad_norm,
                                          progress=progress, recipe=recipe, epoch=epoch - 1,
                                          forward_models=forward_models, guard=guard)
            for m in (model, *recipe.aux_models, *([recipe.ema] if recipe.ema is not None else [])):
                dist.broadcast_buffers(m)  # BatchNorm statistics: rank 0's everywhere, as in the checkpoint
            result = evaluate(model, recipe, val_loader, criterion, device, progress=progress)
            guard.check_validation(result.loss, scheduler.lr, epoch)
            if cfg.score_fn is not None:
                result.score, result.scored_by = float(cfg.score_fn(model)), "model"
            lr = scheduler.lr
            scheduler.step_epoch(result.score)
            row = _history_row(epoch, train_stats, result, lr)
            runlog.add_epoch(row)
            improved = saver.save(model, epoch, result.score, result.scored_by, state, loss=result.loss)
            runlog.flush()
            now = time.monotonic()
            epoch_s = now - epoch_started
            # The budget plans with the mean epoch of this run, saving included: one epoch slowed by another
            # process moves the plan by 1/n of it, instead of cutting the schedule and restoring it later.
            mean_epoch_s = (now - loop_started) / (epoch - start_epoch)
            if cfg.replan is not None and epoch < epochs:
                planned = int(dist.broadcast_object(cfg.replan(epoch, mean_epoch_s)))  # rank 0's clock decides
                if planned != epochs:
                    logger.info(f"Time budget: {mean_epoch_s:.1f} s per epoch so far; {planned} epochs fit in "
                                f"all (planned {epochs}): the schedule now ends there")
                    epochs = scheduler.epochs = planned
            logger.info(_epoch_line(epoch, epochs, train_stats, result, lr, cfg.score_fn is not None, improved))
            if on_epoch_end is not None and on_epoch_end(epoch, {**row, "score": result.score}):
                stop = "on_epoch_end"
            else:
                stop = _stop_reason(cfg, scheduler, epoch, epochs, max(epoch_s, mean_epoch_s), saver.best_epoch)
                if stop is not None:
                    logger.info(stop)
    except Diverged as exc:
        raise _with_what_was_kept(exc, saver) from None
    finally:
        runlog.close()
    return {"best_score": saver.best_score, "best_epoch": saver.best_epoch, "epochs_run": len(runlog.history),
            "stopped_early": stop is not None, "history": runlog.history}


def _score_start(model: nn.Module, recipe: Recipe, val_loader, criterion: nn.Module, device: torch.device,
                 cfg: FitConfig, saver: CheckpointSaver, state: ResumableState, logger: logging.Logger,
                 progress: bool) -> None:
    """Epoch 0: the initial model validated (its EMA is the same model yet) and saved as the best so far."""
    result = evaluate(model, dataclasses.replace(recipe, ema=None), val_loader, criterion, device, progress=progress)
    if cfg.score_fn is not None:
        result.score = float(cfg.score_fn(model))
    saver.save(model, 0, result.score, "model", state, loss=result.loss)
    logger.info(f"epoch   0 (before training)  val loss {result.val['loss']:.4f}  {_metrics_text(result.val)}"
                f"  score {result.score:6.2f}: "
                + ("best.pth until an epoch beats it" if cfg.epochs else "best.pth, with no epoch to train"))


def _stop_reason(cfg: FitConfig, scheduler: LRSchedule, epoch: int, epochs: int, epoch_s: float,
                 best_epoch: int) -> str | None:
    """Why the run should end after `epoch` (of `epochs`), or None: the time budget's deadline would pass
    during another epoch, or early stopping's patience is spent (also said at the last epoch). Every rank takes rank 0's answer."""
    reason = None
    if cfg.deadline is not None and epoch < epochs and time.monotonic() + epoch_s > cfg.deadline:
        reason = (f"Time budget: another epoch ({epoch_s:.0f} s) would end after the deadline; stopping "
                  f"after epoch {epoch} of {epochs}")
    # Early stopping waits until the schedule has lowered the LR: reduce-on-plateau once at least, cosine to half
    # its peak (its best epochs come as it anneals: a 34-epoch budget run on 244 ants/bees photos stopped at
    # epoch 15 at 0.7x the peak LR, test top-1 60.5 where the whole schedule reached 76.3).
    elif (cfg.early_stopping_patience and scheduler.lr_lowered()
          and epoch - best_epoch >= cfg.early_stopping_patience):
        reason = f"Early stopping: no better score for {cfg.early_stopping_patience} epochs"
    return dist.broadcast_object(reason)
