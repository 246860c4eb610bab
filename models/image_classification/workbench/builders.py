"""Template -> engine objects. The only place that knows both the template schema and the engine's API."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from clsengine import data as D
from clsengine.complexity import complexity
from clsengine.losses import create_loss
from clsengine.models import create_model
from clsengine.optim import create_optimizer, create_scheduler
from clsengine.optim.scheduler import WarmupScheduler

from .template import Template


def input_size(t: Template) -> tuple[int, int]:
    return int(t.input.size[0]), int(t.input.size[1])


def build_model(t: Template, num_classes: int, pretrained: str | None = None) -> nn.Module:
    m = t.model
    return create_model(m.architecture, num_classes, width_mult=m.width_mult, dropout=m.dropout,
                        small_input=m.small_input, bn_momentum=m.bn_momentum, pretrained=pretrained)


def eval_transform(t: Template) -> D.transforms.Pipeline:
    return D.build_eval_transform(input_size(t), t.input.mean, t.input.std, bgr=t.input.channel_order == "BGR")


def train_transform(t: Template) -> D.transforms.Pipeline:
    a = t.training.augmentation
    aug = D.AugmentationConfig(random_resized_crop_scale=tuple(a.random_resized_crop_scale), hflip=a.hflip,
                               vflip=a.vflip, rotate_limit=a.rotate_limit, rotate_p=a.rotate_p,
                               color_jitter=a.color_jitter, color_jitter_p=a.color_jitter_p)
    return D.build_train_transform(input_size(t), t.input.mean, t.input.std, aug,
                                   bgr=t.input.channel_order == "BGR")


def report_skipped(scan: D.FolderScan, logger: logging.Logger, out_file: Path | None = None) -> None:
    """Log unreadable files (skipped, never fatal) and list them all in out_file."""
    if not scan.skipped:
        return
    logger.warning(f"{scan.root}: skipped {len(scan.skipped)} unreadable file(s), e.g. {scan.skipped[0][0]}"
                   + (f"; full list in {out_file}" if out_file else ""))
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(out_file, "a", encoding="utf-8") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in scan.skipped)


def make_loader(dataset: D.ImageDataset, t: Template, batch_size: int, train: bool,
                device: torch.device) -> D.EpochLoader:
    return D.EpochLoader(dataset, batch_size=batch_size, shuffle=train, workers=t.training.workers,
                         seed=t.training.seed, drop_last=train, pin_memory=device.type == "cuda")


def build_optimizer(t: Template, model: nn.Module) -> torch.optim.Optimizer:
    o = t.training.optimizer
    return create_optimizer(model, o.name, t.hyper_parameters.basic.base_learning_rate, momentum=o.momentum,
                            weight_decay=o.weight_decay, nesterov=o.nesterov, no_bias_decay=o.no_bias_decay)


def build_scheduler(t: Template, optimizer: torch.optim.Optimizer, iters_per_epoch: int) -> WarmupScheduler:
    s = t.training.scheduler
    return create_scheduler(optimizer, s.name, t.hyper_parameters.basic.epochs, iters_per_epoch,
                            warmup_epochs=s.warmup_epochs, warmup_factor=s.warmup_factor, min_lr=s.min_lr,
                            factor=s.factor, patience=s.patience)


def build_loss(t: Template) -> nn.Module:
    return create_loss(t.training.loss.name, label_smoothing=t.training.loss.label_smoothing)


def model_complexity(t: Template, num_classes: int) -> dict[str, float]:
    """Size and GFLOPs of the template's model at its input size with `num_classes` outputs."""
    return complexity(build_model(t, num_classes), input_size(t))
