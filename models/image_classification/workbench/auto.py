"""A template's `auto` values, decided once per run from the data and the budget.

`resolve` returns the effective template (every `auto` replaced by a value, the one train.py trains with,
saves to config.yaml and stores in checkpoints) and the list of choices with their reasons, one log line
each. The rules themselves live in the engine (clsengine.auto); this module only knows which template key
each rule fills. A key given a value in the template, by a flag or by KEY=VALUE is never touched.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from clsengine import auto as rules
from clsengine.auto import Choice, RunFacts
from clsengine.budget import per_image_cost
from clsengine.data import mirror_asymmetry
from clsengine.models import default_drop_path_rate, uses_depthwise

from .template import AUTO, ModelSection, Template, set_dotted, template_from_dict


def small_input(m: ModelSection, t: Template) -> bool:
    """model.small_input with `auto` decided by the input size (needs no data: eval and export use it too)."""
    return rules.small_input(t.input.size).value if m.small_input == AUTO else bool(m.small_input)


SMALL_IMAGE_TEMPLATE = "convnet_small"  # the catalogue's template built for images of 28-64 px


def small_image_hint(t: Template) -> str | None:
    """A line for the log when an ImageNet backbone is about to train on small images (64 px or less) that
    the small-image template would suit better (on 8000 MNIST digits in 135 s: 98.96 top-1 against 98.40 for
    MobileNetV3-Small on the same held-out split, 99.29 over three splits). None for that template itself and for templates that pin a small-input model
    (person_vs_background_56x32 is built for its size)."""
    height, width = (int(v) for v in t.input.size)
    if min(height, width) > 64 or t.model.architecture == SMALL_IMAGE_TEMPLATE or t.model.small_input is True:
        return None
    return (f"Note: input {height}x{width}: the {SMALL_IMAGE_TEMPLATE} template is built for images this small "
            f"(on 8000 digits in 135 s it reached 98.96 top-1 where mobilenet_v3_small reached 98.40; domain README, "
            f"'A template for small images')")


def mixed_precision(t: Template, device_type: str) -> Choice:
    """training.amp's `auto`, from the device and the architectures (one with depthwise convolutions decides)."""
    archs = [t.model.architecture] + [aux.model.architecture for aux in t.training.mutual_learning.aux_models]
    return rules.mixed_precision(device_type, rules.native_bf16(device_type), any(uses_depthwise(a) for a in archs))


def _passes_per_step(sam: bool, mutual: bool, aux_models: int) -> int:
    """Forward/backward passes of one optimizer step: SAM takes two, each auxiliary model one more."""
    return (2 if sam else 1) * (1 + (aux_models if mutual else 0))


def run_facts(t: Template, train_images: int, num_classes: int, device_type: str, processes: int = 1,
              pretrained: bool = False, samples: Sequence[tuple[str, Any]] | None = None) -> RunFacts:
    """What the rules decide from. `samples` (the training images) are looked at only where a rule needs
    them: the mirror symmetry of the data for training.augmentation.hflip `auto`."""
    mirror = mirror_asymmetry(samples) if samples is not None and t.training.augmentation.hflip == AUTO else None
    return RunFacts(train_images=train_images, num_classes=num_classes,
                    input_size=(int(t.input.size[0]), int(t.input.size[1])), epochs=t.hyper_parameters.basic.epochs,
                    device_type=device_type, processes=processes, pretrained=pretrained, mirror=mirror)


def resolve(t: Template, facts: RunFacts) -> tuple[Template, list[Choice]]:
    """The template with every `auto` decided for `facts`, and the choices made (in the order made)."""
    data = t.to_dict()
    choices: list[Choice] = []

    def decide(choice: Choice) -> Any:
        set_dotted(data, choice.key, choice.value)
        choices.append(choice)
        return choice.value

    tr, basic = t.training, t.hyper_parameters.basic
    # (its dict in `data`, its section, is it the main model): the auxiliary models see the same input and
    # follow the main model's rules, not logged again
    models = [(data["model"], t.model, True)] + [
        (d["model"], aux.model, False) for d, aux in zip(data["training"]["mutual_learning"]["aux_models"],
                                                         tr.mutual_learning.aux_models)]
    for model_data, m, main in models:
        if m.small_input == AUTO:
            choice = rules.small_input(t.input.size)
            model_data["small_input"] = decide(choice) if main else choice.value
    batch = decide(rules.batch_size(facts)) if basic.batch_size == AUTO else basic.batch_size
    optimizer = decide(rules.optimizer(facts, batch)) if tr.optimizer.name == AUTO else tr.optimizer.name
    if tr.optimizer.weight_decay == AUTO:
        decide(rules.weight_decay(optimizer))
    if tr.scheduler.name == AUTO:
        decide(rules.scheduler(facts, batch))
    if tr.scheduler.warmup_epochs == AUTO:
        decide(rules.warmup_epochs(facts))
    level = decide(rules.augmentation_level(facts, batch)) if tr.augmentation_level == AUTO else tr.augmentation_level
    if level == "light":  # written out, so config.yaml shows the augmentation trained with
        data["training"]["augmentation"].update(rules.LIGHT_AUGMENTATION)
    if tr.augmentation.hflip == AUTO:
        decide(rules.hflip(facts))
    lr_pinned = basic.base_learning_rate != AUTO
    if not lr_pinned:
        decide(rules.learning_rate(facts, optimizer, batch))
    for model_data, m, main in models:
        if m.drop_path_rate != AUTO:
            continue
        rate = default_drop_path_rate(m.architecture)  # 0.0 for architectures without stochastic depth
        if rate:
            choice = rules.drop_path_rate(facts, batch, rate)
            rate = decide(choice) if main else choice.value
        model_data["drop_path_rate"] = rate
    tf = tr.transfer
    if tf.linear_probe == AUTO:
        decide(rules.linear_probe(facts, t.model.head == "linear"))
    if tf.trainable_stages == AUTO:
        decide(rules.trainable_stages(facts, batch))
    if tf.freeze_bn == AUTO:
        decide(rules.freeze_bn(facts))
    if tr.amp == AUTO:  # the slowest layers decide: any model with depthwise convolutions
        decide(mixed_precision(t, facts.device_type))
    sam = tr.optimizer.sam.enabled
    if sam == AUTO:
        sam = decide(rules.costly_technique("training.optimizer.sam.enabled", "SAM", facts, batch))
    mutual = tr.mutual_learning.enabled
    if mutual == AUTO:
        mutual = decide(rules.costly_technique("training.mutual_learning.enabled", "mutual learning", facts, batch))
    f = tr.lr_finder
    found: list[Choice] = []
    if f.enabled is not False and AUTO in (f.enabled, f.num_iter):  # nothing to decide for a finder pinned off
        passes = _passes_per_step(sam, mutual, len(tr.mutual_learning.aux_models))
        found = rules.lr_finder(facts, batch, passes, f.warmup_epochs, lr_pinned and f.enabled == AUTO, f.mode,
                            trial_cost_epochs=f.n_trials * f.trial_epochs, pinned_on=f.enabled is True)
    for choice in found:  # a pinned value is kept: only the `auto` ones are decided
        leaf = choice.key.rsplit(".", 1)[1]
        if (f.num_iter if leaf == "num_iter" else f.enabled) == AUTO:
            decide(choice)
    if f.num_iter == AUTO and not any(c.key.endswith(".num_iter") for c in found):
        # The finder does not run (or its budget is too small for a curve): the fewest usable iterations.
        set_dotted(data, "training.lr_finder.num_iter", rules.LR_FINDER_MIN_ITERS)
    return template_from_dict(data, f"{t.name} (auto values decided)"), choices


def with_values(t: Template, values: dict[str, Any]) -> Template:
    """A copy of `t` with dotted keys set to values decided during the run (the LR finder's rate...)."""
    data = t.to_dict()
    for key, value in values.items():
        set_dotted(data, key, value)
    return template_from_dict(data, t.name)


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
# cheaper: then it fits that many more epochs, which on the digits (7000 images, 170 s) is worth more than
# the steps it gives up (3 epochs at batch 16: 98.06 top-1; 5 epochs at 32: 98.40).
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
            passes = _passes_per_step(tr.optimizer.sam.enabled, tr.mutual_learning.enabled,
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


__all__ = ["SMALL_IMAGE_TEMPLATE", "mixed_precision", "plan_time_budget", "resolve", "run_facts", "small_image_hint",
           "small_input", "with_values"]
