"""One training run from a template and scanned data: what train.py runs once and optimize.py once per trial."""
from __future__ import annotations

import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from clsengine import data as datasets
from clsengine import distributed as dist
from clsengine.budget import parse_duration, probe_steps, seconds_per_image
from clsengine.loop import FitConfig, fit
from clsengine.models import classifier, freeze_backbone, load_pretrained
from clsengine.transfer import linear_probe

from . import auto
from . import builders
from .template import Template, dump_config


def scale_learning_rate(lr: float, rule: str, world_size: int) -> float:
    """The base LR for `world_size` processes: each takes a batch of batch_size, so the global batch grows
    with the world; training.scale_lr `rule` linear (x N) or sqrt (x sqrt N) follows it, none keeps the LR."""
    return lr * {"none": 1.0, "linear": float(world_size), "sqrt": float(world_size) ** 0.5}[rule]


LR_KEY = "hyper_parameters.basic.base_learning_rate"


def train(t: Template, train_scan: datasets.DatasetScan, val_scan: datasets.DatasetScan, out: Path, device: torch.device,
          logger: logging.Logger, *, weights: str | None = None, resume: dict[str, Any] | None = None,
          aux_weights: list[str] | None = None, run_info: dict[str, Any] | None = None,
          tensorboard_dir: Path | None = None, checkpoints: bool = True, progress: bool = True,
          on_epoch_end: Callable[[int, dict], bool | None] | None = None, started: float | None = None
          ) -> dict[str, Any] | None:
    """Build the model, loaders, loss and recipe of `t` and fit; returns fit's result, or None when the LR
    finder was asked to stop after finding the rate. The template's `auto` values are decided first
    (workbench.auto, one log line each), then the learning rate (LR finder, world-size scaling); the effective
    template they make is the one trained, saved to config.yaml and stored in the checkpoints. With a time budget the
    epochs are chosen first, from training steps timed here; `started` (time.monotonic()) is when the run
    began, the budget counting from there (default: now)."""
    started = time.monotonic() if started is None else started
    classes = train_scan.classes
    world = dist.info()
    facts = auto.run_facts(t, len(train_scan.samples), len(classes), device.type, world.world_size,
                           pretrained=weights is not None, samples=train_scan.samples)
    budget = t.hyper_parameters.basic.time_budget
    budget_s = parse_duration(budget) if budget is not None and resume is None else None
    head = None
    if weights and resume is None:  # the linear probe runs first: a time budget then plans what is left
        head = probe_head(t, facts, weights, train_scan, val_scan, device, logger)
    if budget_s is not None:
        def measure(resolved: Template) -> float:
            probe_model = builders.build_model(resolved, len(classes))
            if weights:
                builders.prepare_finetuning(resolved, probe_model)
            probe_model.to(device)
            probe_loss = builders.build_loss(resolved, len(classes), train_scan.counts()).to(device)
            warmup, steps = probe_steps(resolved.hyper_parameters.basic.batch_size)
            loader = builders.train_loader(resolved, train_scan, device)
            return seconds_per_image(probe_model, loader, probe_loss, device, steps=steps, warmup=warmup,
                                     memory_format=builders.memory_format(resolved, device),
                                     amp_dtype=builders.amp_dtype(resolved, device))

        t, choices = auto.plan_time_budget(t, facts, budget_s, lambda: time.monotonic() - started, measure,
                                           len(val_scan.samples))
    else:
        t, choices = auto.resolve(t, facts)
    for choice in choices:
        logger.info(str(choice))
    if (hint := auto.small_image_hint(t)) is not None:
        logger.info(hint)
    model = builders.build_model(t, len(classes))
    if weights:
        logger.info(f"Initial weights {load_pretrained(model, weights).describe()}")
        if head is not None:
            classifier(model).load_state_dict(head)
        logger.info(builders.prepare_finetuning(t, model))
    if t.training.freeze_backbone:
        freeze_backbone(model)
    model.to(device)

    train_loader = builders.train_loader(t, train_scan, device)
    val_loader = builders.val_loader(t, val_scan, device)
    counts = train_scan.counts()
    criterion = builders.build_loss(t, len(classes), counts).to(device)
    # The learning rate decided now, after the `auto` values: the LR finder's, then scaled to the world size
    # (an `auto` rate is already global). It enters the effective template once, below.
    lr = t.hyper_parameters.basic.base_learning_rate
    if t.training.lr_finder.enabled and resume is None:
        # Every rank runs the finder on its shard; all then take rank 0's rate.
        lr = dist.broadcast_object(builders.find_learning_rate(t, model, criterion, train_loader, val_loader, device,
                                                               out, logger))
        if t.training.lr_finder.stop_after:
            if world.is_main:
                dump_config({"template": auto.with_values(t, {LR_KEY: lr}).to_dict(), "classes": classes},
                            out / "config.yaml")
            logger.info(f"stop_after: the learning rate is {lr:.4g}; train with --base-learning-rate {lr:.4g}")
            return None
    lr_auto = any(c.key == LR_KEY for c in choices)
    if world.enabled and resume is None and not lr_auto:
        scaled = scale_learning_rate(lr, t.training.scale_lr, world.world_size)
        if scaled != lr:
            logger.info(f"{world.world_size} processes x batch {t.hyper_parameters.basic.batch_size}: learning rate "
                        f"{lr:.4g} -> {scaled:.4g} (training.scale_lr {t.training.scale_lr})")
            lr = scaled
    if lr != t.hyper_parameters.basic.base_learning_rate:
        t = auto.with_values(t, {LR_KEY: lr})
    basic = t.hyper_parameters.basic
    recipe = builders.build_recipe(t, model, len(classes), device, counts)
    if aux_weights and resume is None:
        builders.load_aux_weights(recipe.aux_models, aux_weights)
    optimizer = builders.build_optimizer(t, [model, *recipe.aux_models])
    scheduler = builders.build_scheduler(t, optimizer, len(train_loader))
    logger.info(builders.describe_recipe(t, recipe))

    config = {
        "template": t.to_dict(),
        "classes": classes,
        "run": {"command": " ".join(sys.argv), "train_data": train_scan.source, "val_data": val_scan.source,
                "initial_weights": weights, "processes": world.world_size, "device": str(device),
                "torch": str(torch.__version__), "python": platform.python_version(), **(run_info or {})},
    }
    if world.is_main:
        dump_config(config, out / "config.yaml")
    replan = None
    if budget_s is not None:
        most = facts.epochs  # the template's or --epochs

        def replan(done: int, epoch_s: float) -> int:
            """The epochs that fit, from the real epochs' mean duration: the plan's few timed steps are an
            estimate (on 2 cores they ran 10-40% slower than the epochs that followed)."""
            epochs = max(done, min(most, done + int((started + budget_s - time.monotonic()) // epoch_s)))
            if epochs != config["template"]["hyper_parameters"]["basic"]["epochs"]:
                config["template"]["hyper_parameters"]["basic"]["epochs"] = epochs  # what a resumed run continues
                if world.is_main:
                    dump_config(config, out / "config.yaml")
            return epochs

    fit_cfg = FitConfig(epochs=basic.epochs, output_dir=out, early_stopping_patience=t.training.early_stopping_patience,
                        tensorboard_dir=tensorboard_dir, max_grad_norm=t.training.optimizer.max_grad_norm,
                        progress=progress, checkpoints=checkpoints,
                        deadline=started + budget_s if budget_s is not None else None, replan=replan,
                        score_start=head is not None,  # the probe's model competes for best.pth
                        checkpoint_extra={"config": config, "classes": classes, "arch": t.model.architecture})
    return fit(model, train_loader, val_loader, criterion, optimizer, scheduler, device, fit_cfg, logger,
               resume=resume, recipe=recipe, on_epoch_end=on_epoch_end)


def probe_head(t: Template, facts: auto.RunFacts, weights: str, train_scan: datasets.DatasetScan,
               val_scan: datasets.DatasetScan, device: torch.device, logger: logging.Logger) -> dict | None:
    """The classifier's state fitted by a linear probe on the initial weights' frozen features, when
    training.transfer.linear_probe is on (its `auto`: decided as the run will decide it); None otherwise."""
    resolved, _ = auto.resolve(t, facts)
    if not resolved.training.transfer.linear_probe:
        return None
    model = builders.build_model(resolved, len(train_scan.classes))
    load_pretrained(model, weights)
    layout = builders.memory_format(resolved, device)
    model.to(device, memory_format=layout)
    loss = resolved.training.loss
    result = linear_probe(model, builders.probe_loader(resolved, train_scan, device),
                          builders.val_loader(resolved, val_scan, device), len(train_scan.classes), device,
                          flip=resolved.training.augmentation.hflip > 0, memory_format=layout,
                          amp_dtype=builders.amp_dtype(resolved, device),
                          label_smoothing=loss.label_smoothing if loss.name == "softmax" else 0.0)
    logger.info(result.describe())
    return {k: v.cpu() for k, v in classifier(model).state_dict().items()}


__all__ = ["probe_head", "scale_learning_rate", "train"]
