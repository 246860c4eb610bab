"""One training run from a template and scanned data: what train.py runs once and optimize.py once per trial."""
from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from clsengine import data as datasets
from clsengine import distributed as dist
from clsengine.budget import parse_duration, probe_steps, seconds_per_image
from clsengine.fileio import write_text
from clsengine.loop import Diverged, FitConfig, fit
from clsengine.models import classifier, freeze_backbone, load_pretrained
from clsengine.transfer import ProbeResult, linear_probe

from . import auto, device_policy, distill, factories, loaders, time_budget
from .template import Template, dump_config
from .versions import versions


LR_KEY = "hyper_parameters.basic.base_learning_rate"


def train(t: Template, train_scan: datasets.DatasetScan, val_scan: datasets.DatasetScan, out: Path, device: torch.device,
          logger: logging.Logger, *, weights: str | None = None, resume: dict[str, Any] | None = None,
          aux_weights: list[str] | None = None, run_info: dict[str, Any] | None = None,
          tensorboard_dir: Path | None = None, checkpoints: bool = True, progress: bool = True,
          on_epoch_end: Callable[[int, dict], bool | None] | None = None, started: float | None = None
          ) -> dict[str, Any] | None:
    """Build the model, loaders, loss and recipe of `t` and fit; returns fit's result, or None when the LR
    finder was asked to stop after finding the rate. The template's `auto` values are decided first
    (workbench.auto, one log line each; with a time budget the epochs too, from training steps timed here),
    then the learning rate (LR finder, world-size scaling); the effective template they make is the one
    trained, saved to config.yaml and stored in the checkpoints. `started` (time.monotonic()) is when the run
    began, the budget counting from there (default: now)."""
    started = time.monotonic() if started is None else started
    classes, world = train_scan.classes, dist.info()
    facts = auto.run_facts(t, len(train_scan.samples), len(classes), device.type, world.world_size,
                           pretrained=weights is not None, samples=train_scan.samples)
    budget = t.hyper_parameters.basic.time_budget
    budget_s = parse_duration(budget) if budget is not None and resume is None else None
    head = None
    if weights and resume is None:  # the linear probe runs first: a time budget then plans what is left
        probed = probe_head(t, facts, weights, train_scan, val_scan, device, logger)
        if probed is not None:
            head, probe = probed
            facts = dataclasses.replace(facts, probe_val_errors=probe.val_errors, val_images=probe.val_rows)
    if head is None and t.training.transfer.fine_tune is False:  # nothing to keep instead of training
        logger.info("training.transfer.fine_tune false keeps a linear probe's model, and no probe ran: training runs")
        t = auto.with_values(t, {"training.transfer.fine_tune": True})
    t, choices = decide_auto(t, facts, train_scan, val_scan, device, weights, budget_s, started)
    t, teacher = distill.build_teacher(t, classes, device, logger)  # training.distillation; a bad one fails here
    for choice in choices:
        logger.info(str(choice))
    if (hint := auto.small_image_hint(t)) is not None:
        logger.info(hint)
    model = initial_model(t, len(classes), device, logger, weights, head)
    train_loader = loaders.train_loader(t, train_scan, device)
    val_loader = loaders.val_loader(t, val_scan, device)
    counts = train_scan.counts()
    criterion = factories.build_loss(t, len(classes), counts).to(device)
    lr = learning_rate(t, choices, classes, model, criterion, train_loader, val_loader, device, out, logger, resume)
    if lr is None:  # training.lr_finder.stop_after
        return None
    if lr != t.hyper_parameters.basic.base_learning_rate:
        t = auto.with_values(t, {LR_KEY: lr})
    recipe = factories.build_recipe(t, model, len(classes), device, counts)
    recipe.teacher = teacher
    if aux_weights and resume is None:
        factories.load_aux_weights(recipe.aux_models, aux_weights)
    optimizer = factories.build_optimizer(t, [model, *recipe.aux_models])
    scheduler = factories.build_scheduler(t, optimizer, len(train_loader))
    logger.info(factories.describe_recipe(t, recipe))

    config = {"template": t.to_dict(), "classes": classes,
              "run": {"command": " ".join(sys.argv), "train_data": train_scan.source, "val_data": val_scan.source,
                      "initial_weights": weights, "processes": world.world_size, "device": str(device),
                      "torch": str(torch.__version__), "python": platform.python_version(), "versions": versions(),
                      **(run_info or {})}}
    if world.is_main:
        dump_config(config, out / "config.yaml")
    if not t.training.transfer.fine_tune:
        logger.info("No fine-tuning (training.transfer.fine_tune false): best.pth is the linear probe's model")
    fit_cfg = FitConfig(epochs=t.hyper_parameters.basic.epochs if t.training.transfer.fine_tune else 0, output_dir=out,
                        early_stopping_patience=t.training.early_stopping_patience,
                        tensorboard_dir=tensorboard_dir, max_grad_norm=t.training.optimizer.max_grad_norm,
                        progress=progress, checkpoints=checkpoints,
                        deadline=None if budget_s is None else started + budget_s,
                        replan=None if budget_s is None else replanner(config, out, started + budget_s, facts.epochs),
                        score_start=head is not None,  # the probe's model competes for best.pth
                        checkpoint_extra={"config": config, "classes": classes, "arch": t.model.architecture})
    try:
        return fit(model, train_loader, val_loader, criterion, optimizer, scheduler, device, fit_cfg, logger,
                   resume=resume, recipe=recipe, on_epoch_end=on_epoch_end)
    except Diverged as exc:
        raise Diverged(f"{exc} (--base-learning-rate; this run's: "
                       f"{t.hyper_parameters.basic.base_learning_rate:.3g})") from None


def decide_auto(t: Template, facts: auto.RunFacts, train_scan: datasets.DatasetScan, val_scan: datasets.DatasetScan,
                device: torch.device, weights: str | None, budget_s: float | None, started: float
                ) -> tuple[Template, list[auto.Choice]]:
    """The template's `auto` values (auto.resolve); with a time budget, with the epochs that fit what is left
    of it (time_budget.plan_time_budget, from training steps of each candidate recipe timed here)."""
    resolved, choices = auto.resolve(t, facts)
    if budget_s is None or not resolved.training.transfer.fine_tune:
        return resolved, choices
    classes = len(train_scan.classes)

    def measure(resolved: Template) -> float:
        model = factories.build_model(resolved, classes)
        if weights:
            factories.prepare_finetuning(resolved, model)
        model.to(device)
        loss = factories.build_loss(resolved, classes, train_scan.counts()).to(device)
        warmup, steps = probe_steps(resolved.hyper_parameters.basic.batch_size)
        return seconds_per_image(model, loaders.train_loader(resolved, train_scan, device), loss, device, steps=steps,
                                 warmup=warmup, memory_format=device_policy.memory_format(resolved, device),
                                 amp_dtype=device_policy.amp_dtype(resolved, device))

    return time_budget.plan_time_budget(t, facts, budget_s, lambda: time.monotonic() - started, measure,
                                        len(val_scan.samples))


def initial_model(t: Template, num_classes: int, device: torch.device, logger: logging.Logger,
                  weights: str | None = None, head: dict | None = None) -> nn.Module:
    """The template's model on `device`: from initial `weights` (with the probe's `head`, and what
    training.transfer freezes) or from scratch; training.freeze_backbone applied."""
    model = factories.build_model(t, num_classes)
    if weights:
        logger.info(f"Initial weights {load_pretrained(model, weights).describe()}")
        if head is not None:
            classifier(model).load_state_dict(head)
        if t.training.transfer.fine_tune:
            logger.info(factories.prepare_finetuning(t, model))
    if t.training.freeze_backbone:
        freeze_backbone(model)
    return model.to(device)


def learning_rate(t: Template, choices: list[auto.Choice], classes: list[str], model: nn.Module,
                  criterion: nn.Module, train_loader, val_loader, device: torch.device, out: Path,
                  logger: logging.Logger, resume: dict[str, Any] | None) -> float | None:
    """The base learning rate, decided after the `auto` values: the template's (or its rule's), else the LR
    finder's; then scaled to the world size (an `auto` rate is already global). None when the finder was asked
    to stop after finding it (config.yaml then records it)."""
    world = dist.info()
    lr = t.hyper_parameters.basic.base_learning_rate
    if t.training.lr_finder.enabled and t.training.transfer.fine_tune and resume is None:
        # Every rank runs the finder on its shard; all then take rank 0's rate.
        lr = dist.broadcast_object(find_learning_rate(t, model, criterion, train_loader, val_loader, device, out,
                                                      logger))
        if t.training.lr_finder.stop_after:
            if world.is_main:
                dump_config({"template": auto.with_values(t, {LR_KEY: lr}).to_dict(),
                             "classes": classes}, out / "config.yaml")
            logger.info(f"stop_after: the learning rate is {lr:.4g}; train with --base-learning-rate {lr:.4g}")
            return None
    if world.enabled and resume is None and not any(c.key == LR_KEY for c in choices):
        scaled = dist.scale_learning_rate(lr, t.training.scale_lr, world.world_size)
        if scaled != lr:
            logger.info(f"{world.world_size} processes x batch {t.hyper_parameters.basic.batch_size}: learning rate "
                        f"{lr:.4g} -> {scaled:.4g} (training.scale_lr {t.training.scale_lr})")
            lr = scaled
    return lr


def replanner(config: dict, out: Path, deadline: float, most: int) -> Callable[[int, float], int]:
    """FitConfig.replan for a time budget ending at `deadline` (time.monotonic()): the epochs that fit, at most
    `most` (the template's or --epochs), from the real epochs' mean duration (the plan's few timed steps are
    an estimate: on 2 cores they ran 10-40% slower than the epochs that followed). A change is written to
    config.yaml, which is what a resumed run continues."""
    def replan(done: int, epoch_s: float) -> int:
        epochs = max(done, min(most, done + int((deadline - time.monotonic()) // epoch_s)))
        if epochs != config["template"]["hyper_parameters"]["basic"]["epochs"]:
            config["template"]["hyper_parameters"]["basic"]["epochs"] = epochs
            if dist.info().is_main:
                dump_config(config, out / "config.yaml")
        return epochs

    return replan


def probe_head(t: Template, facts: auto.RunFacts, weights: str, train_scan: datasets.DatasetScan,
               val_scan: datasets.DatasetScan, device: torch.device, logger: logging.Logger
               ) -> tuple[dict[str, torch.Tensor], ProbeResult] | None:
    """The classifier's state fitted by a linear probe on the initial weights' frozen features, and the
    probe's result, when training.transfer.linear_probe is on (its `auto`: decided as the run will decide it);
    None otherwise."""
    resolved, _ = auto.resolve(t, facts)
    if not resolved.training.transfer.linear_probe:
        return None
    model = factories.build_model(resolved, len(train_scan.classes))
    load_pretrained(model, weights)
    layout = device_policy.memory_format(resolved, device)
    model.to(device, memory_format=layout)
    loss = resolved.training.loss
    result = linear_probe(model, loaders.probe_loader(resolved, train_scan, device),
                          loaders.val_loader(resolved, val_scan, device), len(train_scan.classes), device,
                          flip=resolved.training.augmentation.hflip > 0, memory_format=layout,
                          amp_dtype=device_policy.amp_dtype(resolved, device),
                          label_smoothing=loss.label_smoothing if loss.name == "softmax" else 0.0)
    logger.info(result.describe())
    return {k: v.cpu() for k, v in classifier(model).state_dict().items()}, result


def find_learning_rate(t: Template, model: nn.Module, criterion: nn.Module, train_loader, val_loader,
                       device: torch.device, out_dir: Path, logger: logging.Logger) -> float:
    """Run the template's LR finder (clsengine.lr_finder.find_lr) on the main model, which comes back
    unchanged; the result goes to lr_finder.yaml and a PNG in `out_dir`."""
    import yaml

    from clsengine.lr_finder import find_lr

    f = t.training.lr_finder
    plot_path = out_dir / "lr_finder.png"
    result = find_lr(model, lambda m, lr: factories.build_optimizer(t, m, lr, sam=False), criterion, train_loader,
                     val_loader, device, mode=f.mode, min_lr=f.min_lr, max_lr=f.max_lr, num_iter=f.num_iter,
                     smooth_f=f.smooth_f, warmup_epochs=f.warmup_epochs, n_trials=f.n_trials,
                     trial_epochs=f.trial_epochs, seed=t.training.seed, plot_path=plot_path)
    summary = {"lr": float(result.lr), "mode": f.mode, "min_lr": f.min_lr, "max_lr": f.max_lr,
               "note": result.note, "plot": str(result.plot_path) if result.plot_path else None,
               "trials": result.trials}
    write_text(out_dir / "lr_finder.yaml", yaml.safe_dump(summary, sort_keys=False))
    logger.info(f"LR finder ({f.mode}): learning rate {result.lr:.4g}" + (f" ({result.note})" if result.note else "")
                + f"; plot {plot_path}")
    return float(result.lr)


__all__ = ["decide_auto", "find_learning_rate", "initial_model", "learning_rate", "probe_head", "replanner", "train"]
