"""`--time-budget`: the epochs (and, where it pays, a larger batch) that fit a wall-clock budget.

The epochs decide the recipe through the `auto` rules (batch, SAM, mutual learning) and the recipe decides the
cost of an epoch, so plan_time_budget iterates the two to a fixed point from training steps timed on this
machine. training.train replans during the run from the real epochs' durations (FitConfig.replan).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from clsengine import auto as rules
from clsengine.auto import Choice, RunFacts
from clsengine.budget import per_image_cost

from .auto import passes_per_step, resolve, with_values
from .template import AUTO, Template


def plan_time_budget(t: Template, facts: RunFacts, budget_s: float, spent_s: Callable[[], float],
                     seconds_per_image: Callable[[Template], float], val_images: int
                     ) -> tuple[Template, list[Choice]]:
    """resolve() with the epochs chosen to fit `budget_s` (at most facts.epochs). The epochs decide the recipe
    (batch, SAM, mutual learning) and the recipe the cost of an epoch, so the two are iterated to a fixed point.
    `seconds_per_image(resolved)` times a training image of that recipe here, at the smallest batch and at 4x
    it (a pinned batch: at that one only); budget.per_image_cost turns the two into the cost at any batch.
    `spent_s()` is the time already used, measuring included."""
    basic = t.hyper_parameters.basic
    if basic.batch_size != AUTO:
        batches = [basic.batch_size]
    else:
        floor = rules.MIN_BATCH.get(facts.device_type, rules.MIN_BATCH["cpu"])
        batches = [floor, min(rules.MAX_BATCH, 4 * floor)]
    cost = per_image_cost({b: seconds_per_image(resolve(_with(t, facts.epochs, batch=b), facts)[0]) for b in batches})
    spent = spent_s()
    epochs, fit = _fixed_point(t, facts, cost, val_images, budget_s, spent)
    larger: list[Choice] = []
    if basic.batch_size == AUTO:
        batch = resolve(_with(t, epochs), dataclasses.replace(facts, epochs=epochs))[0].hyper_parameters.basic.batch_size
        epochs, fit, larger = _larger_batch(t, facts, cost, val_images, budget_s, spent, epochs, fit, batch)
    resolved, choices = resolve(_with(t, epochs), dataclasses.replace(facts, epochs=epochs)) if not larger else \
        resolve(_with(t, epochs, batch=larger[0].value), dataclasses.replace(facts, epochs=epochs))
    return resolved, [dataclasses.replace(fit, value=epochs), *larger, *choices]


# A doubled batch replaces the step rule's when a budget binds only if it makes a training image this much
# cheaper: then it fits that many more epochs, which on the digits was worth more than the steps it gives up
# (main README, "Your first run").
LARGER_BATCH_SAVING = 1.25


def _larger_batch(t: Template, facts: RunFacts, cost: Callable[[int], float], val_images: int, budget_s: float,
                  spent_s: float, epochs: int, fit: Choice, batch: int) -> tuple[int, Choice, list[Choice]]:
    """The step rule (clsengine.auto.batch_size) aims at TARGET_STEPS optimizer steps in the run, so the fewer
    epochs a budget fits, the smaller the batch, and on a CPU a small batch costs more per image (a step's
    fixed part is shared by fewer images), which fits fewer epochs still. Where doubling the batch makes an
    image LARGER_BATCH_SAVING cheaper and fits more epochs, keeping half the step aim and the steps per
    epoch, the doubled batch is taken (repeatedly). Returns the epochs, their fit and the batch choice (none:
    the step rule's batch stays)."""
    start, start_epochs = batch, epochs
    while 2 * batch <= rules.MAX_BATCH:
        b = 2 * batch
        f = dataclasses.replace(facts, epochs=epochs)
        if (rules.steps_per_epoch(f, b) < rules.MIN_STEPS_PER_EPOCH or cost(batch) < LARGER_BATCH_SAVING * cost(b)):
            break
        e, e_fit = _fixed_point(_with(t, facts.epochs, batch=b), facts, cost, val_images, budget_s, spent_s)
        if e <= epochs or e * rules.steps_per_epoch(f, b) < rules.TARGET_STEPS // 2:
            break
        batch, epochs, fit = b, e, e_fit
    if batch == start:
        return epochs, fit, []
    f = dataclasses.replace(facts, epochs=epochs)
    return epochs, fit, [Choice(
        "hyper_parameters.basic.batch_size", batch,
        f"time budget: batch {batch} ({cost(batch) * 1000:.1f} ms per image) fits {epochs} epochs of "
        f"{rules.steps_per_epoch(f, batch)} steps where the step rule's {start} ({cost(start) * 1000:.1f} ms) fits "
        f"{start_epochs}: more passes over the data at >= {rules.TARGET_STEPS // 2} steps, the step aim halved")]


def _fixed_point(t: Template, facts: RunFacts, cost: Callable[[int], float], val_images: int, budget_s: float,
                 spent_s: float) -> tuple[int, Choice]:
    """The most epochs that fit in the budget with their own recipe. Epochs -> their recipe -> the epochs that
    recipe fits, from facts.epochs on, until a value repeats: a fixed point, or a cycle when more epochs make a
    costlier recipe (a long run's SAM) that fits fewer. In a cycle, the answer lies between its smallest member
    that fits and the largest number of epochs any recipe fits: searched downwards from there."""
    fits: dict[int, Choice] = {}

    def fit(epochs: int) -> Choice:
        if epochs not in fits:
            resolved, _ = resolve(_with(t, epochs), dataclasses.replace(facts, epochs=epochs))
            basic, tr = resolved.hyper_parameters.basic, resolved.training
            passes = passes_per_step(tr.optimizer.sam.enabled, tr.mutual_learning.enabled,
                                      len(tr.mutual_learning.aux_models))
            fits[epochs] = rules.epochs_for_budget(facts, basic.batch_size, passes, cost(basic.batch_size), val_images,
                                               2 if tr.ema.enabled else 1, budget_s, spent_s)
        return fits[epochs]

    epochs = facts.epochs
    while epochs not in fits:
        epochs = fit(epochs).value
    best = max(e for e, choice in fits.items() if choice.value >= e)
    for epochs in range(max(choice.value for choice in fits.values()), best, -1):
        if fit(epochs).value >= epochs:
            best = epochs
            break
    return best, fits[best]


def _with(t: Template, epochs: int, batch: int | None = None) -> Template:
    values = {"hyper_parameters.basic.epochs": epochs}
    if batch is not None:
        values["hyper_parameters.basic.batch_size"] = batch
    return with_values(t, values)


__all__ = ["LARGER_BATCH_SAVING", "plan_time_budget"]
