"""A template's `auto` values, decided once per run from the data and the budget.

`resolve` returns the effective template (every `auto` replaced by a value, the one train.py trains with,
saves to config.yaml and stores in checkpoints) and the list of choices with their reasons, one log line
each. The rules themselves live in the engine (clsengine.auto); this module only knows which template key
each rule fills. A key given a value in the template, by a flag or by KEY=VALUE is never touched.
"""
from __future__ import annotations

from typing import Any, Sequence

from clsengine import auto as rules
from clsengine.auto import Choice, RunFacts
from clsengine.data import mirror_asymmetry
from clsengine.models import default_drop_path_rate, uses_depthwise

from .template import AUTO, ModelSection, Template, set_dotted, template_from_dict


def small_input(m: ModelSection, t: Template) -> bool:
    """model.small_input with `auto` decided by the input size (needs no data: eval and export use it too)."""
    return rules.small_input(t.input.size).value if m.small_input == AUTO else bool(m.small_input)


SMALL_IMAGE_TEMPLATE = "convnet_small"  # the catalogue's template built for images of 28-64 px


def small_image_hint(t: Template) -> str | None:
    """A line for the log when an ImageNet backbone is about to train on small images (64 px or less) that
    the small-image template suits better (more accurate on digits at equal wall time). None for that template
    itself and for templates that pin a small-input model (person_vs_background_56x32 is built for its size)."""
    height, width = (int(v) for v in t.input.size)
    if min(height, width) > 64 or t.model.architecture == SMALL_IMAGE_TEMPLATE or t.model.small_input is True:
        return None
    return (f"Note: input {height}x{width}: the {SMALL_IMAGE_TEMPLATE} template is built for images this small "
            f"(more accurate on digits than mobilenet_v3_small in the same time; domain README, "
            f"'A template for small images')")


def mixed_precision(t: Template, device_type: str) -> Choice:
    """training.amp's `auto`, from the device and the architectures (one with depthwise convolutions decides)."""
    archs = [t.model.architecture] + [aux.model.architecture for aux in t.training.mutual_learning.aux_models]
    return rules.mixed_precision(device_type, rules.native_bf16(device_type), any(uses_depthwise(a) for a in archs))


def passes_per_step(sam: bool, mutual: bool, aux_models: int) -> int:
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
    if tf.fine_tune == AUTO:
        decide(rules.fine_tune(facts))
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
        passes = passes_per_step(sam, mutual, len(tr.mutual_learning.aux_models))
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


__all__ = ["SMALL_IMAGE_TEMPLATE", "mixed_precision", "passes_per_step", "resolve", "run_facts", "small_image_hint",
           "small_input", "with_values"]
