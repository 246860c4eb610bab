"""The training loop: forward, loss, backward, step, schedule, validate, checkpoint. Read it top to bottom."""
from __future__ import annotations

import copy
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
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .errors import UserError
from .losses.mutual import mutual_losses
from .metrics import primary_score, topk_accuracy
from .models.batchnorm import batchnorms, update_momentum as update_bn_momentum
from .optim.scheduler import WarmupScheduler
from .runlog import RunLog


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
    # With a deadline: called after each epoch's validation with (epochs done, seconds that epoch took); returns
    # the number of epochs the run should have in all, which the loop and the schedule then follow.
    replan: Callable[[int, float], int] | None = None


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> tqdm:
    """A bar with rate and ETA; redrawn rarely when stderr is a log file rather than a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, unit="batch")


@dataclass
class Recipe:
    """The optional parts of the recipe that live inside the loop; the defaults give a plain loop.

    SAM needs nothing here: it is recognised by its optimizer (an object with first_step/second_step).
    """
    aux_models: list[nn.Module] = field(default_factory=list)       # mutual learning partners
    aux_criteria: list[nn.Module] = field(default_factory=list)
    mutual_weight: float = 1.0
    mutual_temperature: float = 1.0
    mutual_off_after_epoch: int | None = None
    ema: nn.Module | None = None                                      # torch AveragedModel of the main model
    amp_dtype: torch.dtype | None = None                              # autocast dtype; None: full precision
    grad_scaler: torch.amp.GradScaler | None = None                   # fp16 only
    multilabel: bool = False                                          # sigmoid outputs: mutual terms per label
    memory_format: torch.memory_format = torch.contiguous_format      # of the batches (the models are converted
                                                                      # by the caller)
    compile: bool = False                                             # fit: training forwards via torch.compile
    mix: Callable | None = None                                       # batch MixUp / CutMix (data.build_batch_mix)

    def mutual_weight_at(self, epoch: int) -> float:
        """Weight of the mutual term in (0-based) epoch `epoch`."""
        if not self.aux_models or (self.mutual_off_after_epoch is not None and epoch >= self.mutual_off_after_epoch):
            return 0.0
        return self.mutual_weight


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
    """One loss per model: its own criterion plus, with mutual learning, the weighted KL to the others."""
    with torch.autocast(images.device.type, dtype=recipe.amp_dtype or torch.float32,
                        enabled=recipe.amp_dtype is not None):
        logits = [m(images) for m in models]
    losses = [criterion(x.float(), labels) for criterion, x in zip(criteria, logits)]
    if mutual_weight > 0:
        losses = [loss + mutual_weight * kl
                  for loss, kl in zip(losses, mutual_losses(logits, recipe.mutual_temperature, recipe.multilabel))]
    return losses


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: WarmupScheduler, device: torch.device, desc: str = "train",
                    max_grad_norm: float | None = None, progress: bool = True, recipe: Recipe | None = None,
                    epoch: int = 0, forward_models: list[nn.Module] | None = None) -> dict[str, float]:
    """One pass over `loader`. With a SAM optimizer every step takes two forward/backward passes.

    `forward_models` (the model and auxiliary models wrapped in DistributedDataParallel) run the forward
    passes in a distributed run, so that gradients are averaged over the ranks.
    """
    recipe = recipe or Recipe()
    models = [model, *recipe.aux_models]
    forward = forward_models or models
    criteria = [criterion, *recipe.aux_criteria]
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    mutual_weight = recipe.mutual_weight_at(epoch)
    sam = hasattr(optimizer, "first_step")
    scaler = recipe.grad_scaler
    for m in models:
        m.train()

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
        if not math.isfinite(main_loss):
            raise UserError(f"{desc}: the loss became {main_loss} (learning rate {scheduler.lr:.3g} too high?)")
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
            desc: str = "eval", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader, on the CPU. `model` may also be any callable from an image
    batch to logits, such as an exported model (clsengine.inference.ExportedClassifier)."""
    if isinstance(model, nn.Module):
        model.eval()
    all_logits, all_labels = [], []
    for images, labels in _progress(loader, len(loader), desc, progress):
        all_logits.append(model(images.to(device, non_blocking=True)).float().cpu())
        all_labels.append(labels)
    # A distributed loader gives each rank a shard: every rank gets all of them, so metrics are whole.
    return dist.gather(torch.cat(all_logits)), dist.gather(torch.cat(all_labels))


def validate(model: nn.Module, loader, criterion: nn.Module, device: torch.device,
             progress: bool = True) -> dict[str, float]:
    """Loss and top-1/top-5 (top-5 with more than 5 classes), or mAP when the loader yields multi-hot
    (multi-label) targets."""
    logits, labels = predict(model, loader, device, desc="val", progress=progress)
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


CHECKPOINT_FORMAT = "clsengine-checkpoint-v1"


@dataclass
class ResumableState:
    """What a checkpoint needs beyond the weights for training to continue where it stopped."""
    optimizer: torch.optim.Optimizer
    scheduler: WarmupScheduler
    recipe: Recipe
    history: list[dict] = field(default_factory=list)


def checkpoint_state(model: nn.Module, *, epoch: int, score: float, best_score: float, best_epoch: int,
                     extra: dict[str, Any], weights_from: str = "model", best_from: str | None = None,
                     resumable: ResumableState | None = None) -> dict[str, Any]:
    """The one checkpoint dict (plain types and tensors, loadable with weights_only=True) that every writer
    builds: the training loop's epochs, and compression's PTQ model. `resumable` adds what --resume-from
    continues with (optimizer, scheduler, EMA, auxiliary models, grad scaler, history, RNG state).
    `best_top1` and `val_top1` hold the run's score, mAP for a multi-label model."""
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "weights_from": weights_from,
             "epoch": epoch, "best_top1": best_score, "best_epoch": best_epoch, "val_top1": score}
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


def best_from_latest(state: dict[str, Any]) -> dict[str, Any]:
    """best.pth's content from the latest.pth of the epoch that was the best: the model's weights or, where
    the EMA scored higher (`best_from`), the average's."""
    best = dict(state)
    if state.get("best_from") == "ema":
        best["model"] = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        best["weights_from"] = "ema"
    return best


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


def fit(model: nn.Module, train_loader, val_loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: WarmupScheduler, device: torch.device, cfg: FitConfig, logger: logging.Logger,
        resume: dict[str, Any] | None = None, on_epoch_end: Callable[[int, dict], bool | None] | None = None,
        recipe: Recipe | None = None) -> dict[str, Any]:
    """Train for cfg.epochs, validating each epoch; write latest.pth every epoch and best.pth on improvement.

    With an EMA, both the model and its average are validated and best.pth carries the better weights
    (`weights_from` says which). `resume` is a checkpoint dict written by this function: training
    continues after its epoch with the optimizer, scheduler, EMA, auxiliary models, RNG state, history
    and best metric it holds. `on_epoch_end(epoch, row)` sees each epoch's history row (with its "score")
    after the checkpoints are written; returning True stops the run there (compression's accuracy budget
    reached; a search trial is pruned by raising instead).
    """
    recipe = recipe or Recipe()
    world = dist.info()
    main = world.is_main  # only rank 0 writes checkpoints, logs and curves
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, best_top1, best_epoch, history = 0, -1.0, 0, []
    if resume is not None:
        restore_training_state(resume, model, ResumableState(optimizer, scheduler, recipe))
        start_epoch = int(resume["epoch"])
        best_top1, best_epoch = float(resume["best_top1"]), int(resume["best_epoch"])
        history = list(resume.get("history", []))
        logger.info(f"Resuming after epoch {start_epoch} (best top-1 {best_top1:.2f} at epoch {best_epoch})")
        if main and cfg.checkpoints:
            repair_best(resume, output_dir / "best.pth", logger)
    runlog = RunLog(output_dir, cfg.tensorboard_dir if main else None, history, write=main)
    forward_models = [dist.wrap(m) for m in (model, *recipe.aux_models)] if world.enabled else None
    if recipe.compile:  # compiled on the first step; validation and the weights stay with the plain modules
        forward_models = [torch.compile(m) for m in forward_models or (model, *recipe.aux_models)]
    progress = cfg.progress and main

    stopped_early = False
    epochs, epoch = cfg.epochs, start_epoch - 1
    try:
        while epoch + 1 < epochs:
            epoch += 1
            epoch_started = time.monotonic()
            for loader in (train_loader, val_loader):
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
            train_stats = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                                          desc=f"epoch {epoch + 1}/{epochs}", max_grad_norm=cfg.max_grad_norm,
                                          progress=progress, recipe=recipe, epoch=epoch, forward_models=forward_models)
            for m in (model, *recipe.aux_models, *([recipe.ema] if recipe.ema is not None else [])):
                dist.broadcast_buffers(m)  # BatchNorm statistics: rank 0's everywhere, as in the checkpoint
            val_stats = validate(model, val_loader, criterion, device, progress=progress)
            ema_stats = (validate(recipe.ema.module, val_loader, criterion, device, progress=progress)
                         if recipe.ema is not None else None)
            key = score_key(val_stats)
            use_ema = ema_stats is not None and ema_stats[key] > val_stats[key]
            score = ema_stats[key] if use_ema else val_stats[key]
            if cfg.score_fn is not None:
                score, use_ema = float(cfg.score_fn(model)), False
            lr = scheduler.lr
            scheduler.step_epoch(score)
            epoch_s = time.monotonic() - epoch_started
            if cfg.replan is not None and epoch + 1 < epochs:
                planned = int(dist.broadcast_object(cfg.replan(epoch + 1, epoch_s)))  # rank 0's clock decides
                if planned != epochs:
                    logger.info(f"Time budget: epoch {epoch + 1} took {epoch_s:.1f} s; {planned} epochs fit in all "
                                f"(planned {epochs}): the schedule now ends there")
                    epochs = scheduler.epochs = planned
            improved = score > best_top1
            if improved:
                best_top1, best_epoch = score, epoch + 1
            row = {"epoch": epoch + 1, "train_loss": train_stats["loss"], "val_loss": val_stats["loss"],
                   "val_top1": val_stats.get("top1", ""), "val_top5": val_stats.get("top5", ""),
                   "val_map": val_stats.get("mAP", ""),
                   f"ema_val_{key.lower()}": ema_stats[key] if ema_stats else "", "lr": lr,
                   "epoch_time_s": train_stats["time_s"], "images_per_s": train_stats["images_per_s"]}
            runlog.add_epoch(row)
            row["score"] = score
            if main and cfg.checkpoints:
                state = checkpoint_state(model, epoch=epoch + 1, score=score, best_score=best_top1,
                                         best_epoch=best_epoch, extra=cfg.checkpoint_extra,
                                         resumable=ResumableState(optimizer, scheduler, recipe, runlog.history),
                                         best_from=("ema" if use_ema else "model") if improved else None)
                # latest.pth first: a kill between the two writes leaves a latest.pth of the best epoch,
                # from which resuming rebuilds best.pth (repair_best).
                save_checkpoint(state, output_dir / "latest.pth")
                if improved:
                    save_checkpoint(best_from_latest(state), output_dir / "best.pth")
            runlog.flush()
            ema_text = f"  EMA {'top-1' if key == 'top1' else key} {ema_stats[key]:6.2f}" if ema_stats else ""
            logger.info(f"epoch {epoch + 1:3d}/{epochs}  loss {train_stats['loss']:.4f}  "
                        f"val loss {val_stats['loss']:.4f}  {_metrics_text(val_stats)}{ema_text}"
                        + (f"  score {score:6.2f}" if cfg.score_fn is not None else "")
                        + f"  lr {lr:.3g}  {train_stats['time_s']:.1f}s  "
                        f"{train_stats['images_per_s']:.0f} img/s" + ("  *best*" if improved else ""))
            if on_epoch_end is not None and on_epoch_end(epoch + 1, row):
                stopped_early = True
                break
            late = cfg.deadline is not None and epoch + 1 < epochs and time.monotonic() + epoch_s > cfg.deadline
            if dist.broadcast_object(late):
                logger.info(f"Time budget: another epoch ({epoch_s:.0f} s) would end after the deadline; stopping "
                            f"after epoch {epoch + 1} of {epochs}")
                stopped_early = True
                break
            # With reduce-on-plateau, early stopping waits until the LR has been reduced at least once.
            lr_reduced = scheduler.name != "plateau" or scheduler.num_reductions > 0
            if (cfg.early_stopping_patience and lr_reduced
                    and epoch + 1 - best_epoch >= cfg.early_stopping_patience):
                logger.info(f"Early stopping: no better top-1 for {cfg.early_stopping_patience} epochs")
                stopped_early = True
                break
    finally:
        runlog.close()
    return {"best_top1": best_top1, "best_epoch": best_epoch, "epochs_run": len(runlog.history),
            "stopped_early": stopped_early, "history": runlog.history}
