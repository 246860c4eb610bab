"""Pick a learning rate before training: the fast.ai range test, or a short optuna search over real runs.

`range_test` is cheap (one pass of num_iter batches with an exponentially growing LR) and leaves the model,
optimizer and RNGs exactly as it found them. `search_lr` trains a few epochs per candidate LR, so it costs
n_trials short trainings but measures what matters (validation score) instead of the training-loss slope.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .checkpoint import rng_state, set_rng_state
from .errors import UserError
from .loop import score_key, train_one_epoch, validate
from .optim import SAM, create_scheduler

MAX_SKIP_START, MAX_SKIP_END = 10, 5   # torch-lr-finder's plot() defaults, scaled down for short runs
MIN_POINTS = 5                         # fewer points left after skipping: no meaningful slope


LR_FINDER_MODES = ("fast_ai", "tpe", "grid")  # the range test; optuna TPE trials; a grid of trials


@dataclass
class LRFinderResult:
    """The suggested LR and the evidence behind it.

    Range test: `lrs`/`losses` are the whole (finite) smoothed curve, one point per batch.
    Search: `lrs`/`losses` stay empty and `trials` holds one dict per optuna trial
    (number, lr, score, state "COMPLETE"/"PRUNED"/"FAIL", epochs reported).
    """
    lr: float
    mode: str
    lrs: list[float]
    losses: list[float]
    plot_path: str | None
    note: str = ""
    trials: list[dict[str, Any]] = field(default_factory=list)


def skip_counts(num_iter: int) -> tuple[int, int]:
    """Points trimmed before/after the slope search: the start is noisy, the end is the divergence."""
    return min(MAX_SKIP_START, num_iter // 10), min(MAX_SKIP_END, num_iter // 20)


def _check_range(min_lr: float, max_lr: float) -> None:
    if not (0 < min_lr < max_lr and math.isfinite(max_lr)):
        raise UserError(f"learning-rate range [{min_lr}, {max_lr}] must satisfy 0 < min_lr < max_lr")


def _finish(fig, ax, ylabel: str, title: str, path: str | Path) -> str:
    """Shared styling of the two LR plots (log learning-rate axis), then save."""
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    from .plots import save_figure
    return str(save_figure(fig, path))


def _plot_range_test(lrs: list[float], losses: list[float], kept: slice, lr: float | None,
                     title: str, path: str | Path) -> str:
    from . import plots  # noqa: F401  (selects the headless Agg backend)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.35, label="smoothed loss (skipped ends faint)")
    ax.plot(lrs[kept], losses[kept], color="tab:blue")
    if lr is not None:
        ax.axvline(lr, color="tab:red", linestyle="--", linewidth=1)
        ax.scatter([lr], [np.interp(np.log(lr), np.log(lrs), losses)], color="tab:red", zorder=3, s=60,
                   label=f"steepest descent: {lr:.3g}")
    return _finish(fig, ax, "training loss (smoothed)", title, path)


def _suggest(lrs: list[float], losses: list[float], num_iter: int, min_lr: float,
             max_lr: float) -> tuple[float | None, slice, str]:
    """Steepest negative slope of the smoothed loss (what torch-lr-finder's plot(suggest_lr=True) marks)."""
    skip_start, skip_end = skip_counts(num_iter)
    kept = slice(skip_start, len(losses) - skip_end)
    window = losses[kept]
    if len(window) < MIN_POINTS:
        return None, kept, (f"curve too short for a suggestion ({len(losses)} points, {len(window)} after "
                            f"skipping {skip_start}+{skip_end}); returned min_lr")
    grad = np.gradient(np.asarray(window, dtype=float))
    i = int(grad.argmin())
    if grad[i] >= 0:
        return None, kept, "the smoothed loss never decreased; returned min_lr (try a wider range or a warm-up)"
    return float(min(max(lrs[kept][i], min_lr), max_lr)), kept, ""


def range_test(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, train_loader,
               device: torch.device | str, *, min_lr: float, max_lr: float, num_iter: int = 100,
               smooth_f: float = 0.01, diverge_th: float = 5.0, warmup_epochs: int = 0,
               warmup_fn: Callable[[], None] | None = None,
               plot_path: str | Path | None = None) -> LRFinderResult:
    """Run the LR range test (exponential sweep min_lr -> max_lr) and suggest the steepest-descent LR.

    `train_loader` is a DataLoader, an EpochLoader or any re-iterable of (images, labels); it is cycled if
    shorter than num_iter. With warmup_epochs > 0, `warmup_fn()` (which should train that many epochs with
    the caller's own loop) runs first so the sweep starts from warmed-up weights instead of the random
    init. Afterwards the model (weights, buffers, train/eval modes, device), the optimizer (state and param
    groups, including an attached LRSchedule's `initial_lr`) and the RNGs are exactly as before the
    warm-up, so the real training that follows does not depend on whether the test ran.
    """
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    _check_range(min_lr, max_lr)
    if num_iter < 2:
        raise UserError(f"the range test needs num_iter >= 2, got {num_iter}")
    if not 0 <= smooth_f < 1:
        raise UserError(f"smooth_f must be in [0, 1), got {smooth_f}")
    if isinstance(optimizer, SAM):
        raise UserError("the LR range test takes plain optimizer.step() calls, which SAM-style optimizers refuse; "
                        "run it with a plain optimizer (the one SAM wraps), then train with SAM at the suggested LR")
    if warmup_epochs < 0 or (warmup_epochs > 0 and warmup_fn is None):
        raise UserError(f"warmup_epochs={warmup_epochs} needs warmup_epochs >= 0 and, if > 0, a warmup_fn")

    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    modes = {m: m.training for m in model.modules()}
    param_device = next(model.parameters()).device
    rng = rng_state()
    # torch's LR schedulers (LRFinder uses one) patch `step` onto the optimizer instance; undo that too.
    patched = {k: optimizer.__dict__[k] for k in ("step", "_opt_called") if k in optimizer.__dict__}
    notes = []
    try:
        if warmup_epochs > 0:
            warmup_fn()
            notes.append(f"after {warmup_epochs} warm-up epoch(s)")
        # LRFinder refuses optimizers that carry a scheduler's `initial_lr`; it is restored below.
        for group in optimizer.param_groups:
            group.pop("initial_lr", None)
        if not isinstance(train_loader, (DataLoader, TrainDataLoaderIter)):
            train_loader = TrainDataLoaderIter(train_loader)   # EpochLoader & co: cycled the same way
        finder = LRFinder(model, optimizer, criterion, device=device)
        with contextlib.redirect_stdout(io.StringIO()):   # its prints; divergence is reported in `note`
            finder.range_test(train_loader, start_lr=min_lr, end_lr=max_lr, num_iter=num_iter, step_mode="exp",
                              smooth_f=smooth_f, diverge_th=diverge_th)
        lrs = [float(v) for v in finder.history["lr"]]
        losses = [float(v) for v in finder.history["loss"]]
    finally:
        model.load_state_dict(model_state)
        model.to(param_device)
        for m, training in modes.items():
            m.training = training
        optimizer.load_state_dict(optim_state)   # after model.to(): state follows the parameters' device
        for k in ("step", "_opt_called"):
            optimizer.__dict__.pop(k, None)
        optimizer.__dict__.update(patched)
        set_rng_state(rng)

    finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    if finite < len(losses):
        notes.append(f"loss became non-finite at lr {lrs[finite]:.3g}; curve cut there")
        lrs, losses = lrs[:finite], losses[:finite]
    elif len(losses) < num_iter:
        notes.append(f"stopped at lr {lrs[-1]:.3g}: loss exceeded {diverge_th:g}x its best")
    lr, kept, why = _suggest(lrs, losses, num_iter, min_lr, max_lr)
    if why:
        notes.append(why)
    lr = min_lr if lr is None else lr
    saved = None
    if plot_path is not None and lrs:
        saved = _plot_range_test(lrs, losses, kept, None if why else lr,
                                 f"LR range test [{min_lr:.2g}, {max_lr:.2g}], {len(lrs)} batches"
                                 + (f"\n{'; '.join(notes)}" if notes else ""), plot_path)
    return LRFinderResult(lr=lr, mode="range_test", lrs=lrs, losses=losses, plot_path=saved,
                          note="; ".join(notes))


def log_grid(min_lr: float, max_lr: float, n: int) -> list[float]:
    """n log-spaced LRs with exact endpoints (optuna rejects grid values outside the suggest range)."""
    return [float(min(max(v, min_lr), max_lr)) for v in np.geomspace(min_lr, max_lr, n)]


def _plot_search(trials: list[dict[str, Any]], best: dict[str, Any], title: str, path: str | Path) -> str:
    from . import plots  # noqa: F401  (selects the headless Agg backend)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for state, style in (("COMPLETE", dict(marker="o", color="tab:blue", label="complete")),
                         ("PRUNED", dict(marker="x", color="tab:orange", label="pruned (last reported)"))):
        points = [(t["lr"], t["score"]) for t in trials if t["state"] == state and t["score"] is not None]
        if points:
            ax.scatter(*zip(*points), **style)
    for i, t in enumerate(t for t in trials if t["state"] == "FAIL"):
        ax.axvline(t["lr"], color="grey", linestyle=":", label="failed" if i == 0 else None)
    ax.scatter([best["lr"]], [best["score"]], marker="*", s=250, color="tab:red", zorder=3,
               label=f"best: {best['lr']:.3g}")
    return _finish(fig, ax, "score (higher is better)", title, path)


def search_lr(train_and_score: Callable[[float, Callable[[int, float], None]], float], *, min_lr: float,
              max_lr: float, mode: str = "tpe", n_trials: int = 15, seed: int = 0,
              plot_path: str | Path | None = None) -> LRFinderResult:
    """Find the LR whose short training scores best, pruning runs that fall behind early.

    `train_and_score(lr, report)` trains a fresh model at `lr`, calls `report(epoch, score)` after every
    epoch (higher is better) and returns the final score. `report` raises optuna.TrialPruned when the run
    is below the median of earlier runs at that epoch; let it propagate. A UserError from a run (e.g. the
    loop's non-finite loss at a too-high LR) fails that trial only. mode "tpe" samples log-uniformly and
    then models where the good LRs are; "grid" tries n_trials log-spaced LRs in a seeded random order.
    """
    import optuna

    _check_range(min_lr, max_lr)
    if n_trials < 1:
        raise UserError(f"n_trials must be >= 1, got {n_trials}")
    if mode == "tpe":
        # optuna's default of 10 random start-up trials would leave little for TPE in a 15-trial budget.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)))
    elif mode == "grid":
        sampler = optuna.samplers.GridSampler({"lr": log_grid(min_lr, max_lr, n_trials)}, seed=seed)
    else:
        raise UserError(f"unknown LR search mode '{mode}'; known: tpe, grid")

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", min_lr, max_lr, log=True)

        def report(epoch: int, score: float) -> None:
            trial.report(float(score), step=int(epoch))
            if trial.should_prune():
                raise optuna.TrialPruned(f"lr {lr:.3g}: score {score:.4g} below the median at epoch {epoch}")

        return float(train_and_score(lr, report))

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", sampler=sampler,
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
        study.optimize(objective, n_trials=n_trials, catch=(UserError,))
    finally:
        optuna.logging.set_verbosity(verbosity)

    trials = []
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        score = t.value if t.state == optuna.trial.TrialState.COMPLETE else (
            t.intermediate_values[steps[-1]] if steps else None)
        trials.append({"number": t.number, "lr": float(t.params["lr"]), "score": score, "state": t.state.name,
                       "epochs": len(steps)})
    counts = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    summary = f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
    if not counts["COMPLETE"]:
        raise UserError(f"LR search over [{min_lr:.3g}, {max_lr:.3g}]: no trial completed ({summary})")
    best = max((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: t["score"])
    saved = None
    if plot_path is not None:
        saved = _plot_search(trials, best, f"LR search ({mode}, {len(trials)} trials): {summary}", plot_path)
    return LRFinderResult(lr=best["lr"], mode=mode, lrs=[], losses=[], plot_path=saved,
                          note=f"{summary}; best score {best['score']:.4g}", trials=trials)


def find_lr(model: nn.Module, make_optimizer: Callable[[nn.Module, float], torch.optim.Optimizer],
            criterion: nn.Module, train_loader, val_loader, device: torch.device, *, mode: str, min_lr: float,
            max_lr: float, num_iter: int = 100, smooth_f: float = 0.01, warmup_epochs: int = 0,
            n_trials: int = 15, trial_epochs: int = 6, seed: int = 0,
            plot_path: str | Path | None = None) -> LRFinderResult:
    """A training run's LR finder; `model` comes back unchanged. fast_ai: the range test over [min_lr, max_lr]
    after `warmup_epochs` epochs at min_lr (then restored). tpe / grid: trials that each train a fresh copy of
    the model for `trial_epochs` epochs at one rate (cosine), scored by val top-1 (mAP for multi-label).
    `make_optimizer(model, lr)` builds the run's optimizer without SAM (the range test steps plainly)."""
    if mode == "fast_ai":
        optimizer = make_optimizer(model, min_lr)
        warmup_scheduler = create_scheduler(optimizer, "constant", 1, len(train_loader))

        def warmup() -> None:
            for epoch in range(warmup_epochs):
                train_one_epoch(model, train_loader, criterion, optimizer, warmup_scheduler, device,
                                desc=f"LR finder warm-up {epoch + 1}/{warmup_epochs}")

        return range_test(model, optimizer, criterion, train_loader, device, min_lr=min_lr, max_lr=max_lr,
                          num_iter=num_iter, smooth_f=smooth_f, warmup_epochs=warmup_epochs,
                          warmup_fn=warmup if warmup_epochs else None, plot_path=plot_path)
    initial = copy.deepcopy(model.state_dict())

    def train_and_score(lr: float, report: Callable[[int, float], None]) -> float:
        trial_model = copy.deepcopy(model)
        trial_model.load_state_dict(initial)
        optimizer = make_optimizer(trial_model, lr)
        scheduler = create_scheduler(optimizer, "cosine", trial_epochs, len(train_loader))
        score = 0.0
        for epoch in range(trial_epochs):
            train_one_epoch(trial_model, train_loader, criterion, optimizer, scheduler, device,
                            desc=f"LR trial {lr:.3g} epoch {epoch + 1}/{trial_epochs}")
            stats = validate(trial_model, val_loader, criterion, device)
            score = stats[score_key(stats)]
            report(epoch + 1, score)
        return score

    return search_lr(train_and_score, min_lr=min_lr, max_lr=max_lr, mode=mode, n_trials=n_trials, seed=seed,
                     plot_path=plot_path)
