"""The training loop: forward, loss, backward, step, schedule, validate, checkpoint. Read it top to bottom."""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .errors import UserError
from .metrics import topk_correct
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
    # Stored verbatim in every checkpoint (class names, effective config...): plain Python types only.
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> tqdm:
    """A bar with rate and ETA; redrawn rarely when stderr is a log file rather than a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, unit="batch")


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: WarmupScheduler, device: torch.device, desc: str = "train",
                    max_grad_norm: float | None = None, progress: bool = True) -> dict[str, float]:
    model.train()
    total_loss, seen = 0.0, 0
    start = time.perf_counter()
    bar = _progress(loader, len(loader), desc, progress)
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        loss = criterion(logits, labels)
        if not math.isfinite(loss.item()):
            raise UserError(f"{desc}: the loss became {loss.item()} (learning rate {scheduler.lr:.3g} too high?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step_iter()
        total_loss += loss.item() * images.shape[0]
        seen += images.shape[0]
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{scheduler.lr:.3g}", img_s=f"{seen / elapsed:.1f}", refresh=False)
    elapsed = time.perf_counter() - start
    return {"loss": total_loss / max(1, seen), "time_s": elapsed, "images_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, desc: str = "eval",
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of a loader, on the CPU."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in _progress(loader, len(loader), desc, progress):
        all_logits.append(model(images.to(device, non_blocking=True)).float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def validate(model: nn.Module, loader, criterion: nn.Module, device: torch.device,
             progress: bool = True) -> dict[str, float]:
    logits, labels = predict(model, loader, device, desc="val", progress=progress)
    correct = topk_correct(logits, labels, (1, 5))
    n = max(1, len(labels))
    return {"loss": float(criterion(logits, labels)), "top1": 100.0 * correct[1] / n, "top5": 100.0 * correct[5] / n}


def fit(model: nn.Module, train_loader, val_loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: WarmupScheduler, device: torch.device, cfg: FitConfig, logger: logging.Logger,
        resume: dict[str, Any] | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train for cfg.epochs, validating each epoch; write latest.pth every epoch and best.pth on improvement.

    `resume` is a checkpoint dict written by this function: training continues after its epoch with the
    optimizer, scheduler, RNG state, history and best metric it holds.
    """
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, best_top1, best_epoch, history = 0, -1.0, 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch = int(resume["epoch"])
        best_top1, best_epoch = float(resume["best_top1"]), int(resume["best_epoch"])
        history = list(resume.get("history", []))
        set_rng_state(resume["rng"])
        logger.info(f"Resuming after epoch {start_epoch} (best top-1 {best_top1:.2f} at epoch {best_epoch})")
    runlog = RunLog(output_dir, cfg.tensorboard_dir, history)

    stopped_early = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            for loader in (train_loader, val_loader):
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
            train_stats = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                                          desc=f"epoch {epoch + 1}/{cfg.epochs}", max_grad_norm=cfg.max_grad_norm,
                                          progress=cfg.progress)
            val_stats = validate(model, val_loader, criterion, device, progress=cfg.progress)
            lr = scheduler.lr
            scheduler.step_epoch(val_stats["top1"])
            improved = val_stats["top1"] > best_top1
            if improved:
                best_top1, best_epoch = val_stats["top1"], epoch + 1
            row = {"epoch": epoch + 1, "train_loss": train_stats["loss"], "val_loss": val_stats["loss"],
                   "val_top1": val_stats["top1"], "val_top5": val_stats["top5"], "lr": lr,
                   "epoch_time_s": train_stats["time_s"], "images_per_s": train_stats["images_per_s"]}
            runlog.add_epoch(row)
            state = {
                "format": "clsengine-checkpoint-v1",
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "val_top1": val_stats["top1"],
                "history": runlog.history,
                "rng": rng_state(),
                **cfg.checkpoint_extra,
            }
            save_checkpoint(state, output_dir / "latest.pth")
            if improved:
                save_checkpoint(state, output_dir / "best.pth")
            runlog.flush()
            logger.info(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {train_stats['loss']:.4f}  "
                        f"val loss {val_stats['loss']:.4f}  top-1 {val_stats['top1']:6.2f}  "
                        f"top-5 {val_stats['top5']:6.2f}  lr {lr:.3g}  {train_stats['time_s']:.1f}s  "
                        f"{train_stats['images_per_s']:.0f} img/s" + ("  *best*" if improved else ""))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
            if cfg.early_stopping_patience and epoch + 1 - best_epoch >= cfg.early_stopping_patience:
                logger.info(f"Early stopping: no better top-1 for {cfg.early_stopping_patience} epochs")
                stopped_early = True
                break
    finally:
        runlog.close()
    return {"best_top1": best_top1, "best_epoch": best_epoch, "epochs_run": len(runlog.history),
            "stopped_early": stopped_early, "history": runlog.history}
