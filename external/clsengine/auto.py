"""Defaults that fit the data and the budget: the rules behind a template's `auto` values.

A recipe tuned for 200-epoch ImageNet fine-tuning (batch 128, SGD on a plateau schedule, SAM, an auxiliary
model, a 100-iteration LR finder) gives a user's first run on a few hundred images two optimizer steps per
epoch, spends most of its minutes on the LR finder and never decays the LR. Each rule below chooses one value
from what is known before training starts (RunFacts) and says why, in words that go to the log.

The planned number of optimizer steps decides most of it: below LONG_RUN_STEPS (Ultralytics' threshold for
`optimizer=auto`), a run is short: AdamW with a short warm-up and a cosine decay, no SAM and no auxiliary
model (each doubles the cost of a step, which a short run cannot pay back at equal wall time: see the
domain README's ablation), and an LR finder only if it costs at most LR_FINDER_BUDGET of the training.
A long run keeps the published recipe: SGD, plateau schedule, SAM, mutual learning, LR finder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .data.symmetry import MirrorAsymmetry

LONG_RUN_STEPS = 10_000       # planned optimizer steps from which a run counts as long
TARGET_STEPS = 1_000          # the batch is the largest that still gives this many steps in the run...
MIN_STEPS_PER_EPOCH = 8       # ...and this many per epoch
MAX_BATCH = 128
MIN_BATCH = {"cpu": 16, "cuda": 32}
AMP_MODES = ("none", "bf16", "fp16")  # training.amp: full precision, or autocast to bfloat16 / float16
AUGMENTATION_LEVELS = ("light", "full")  # training.augmentation_level (LIGHT_AUGMENTATION below)
SMALL_INPUT_BELOW = 64        # px: a 32x-downsampling network would end on a 1x1 feature map
LR_FINDER_BUDGET = 0.05       # the LR finder may cost this share of the planned training passes
LR_FINDER_MIN_ITERS = 30      # fewer points give no usable loss curve
LR_FINDER_MAX_ITERS = 100


@dataclass(frozen=True)
class RunFacts:
    """What a run knows before it starts."""
    train_images: int
    num_classes: int
    input_size: tuple[int, int]
    epochs: int
    device_type: str = "cpu"          # cpu | cuda
    processes: int = 1
    pretrained: bool = False          # initial weights given (fine-tuning)
    mirror: MirrorAsymmetry | None = None   # of the training images (data.mirror_asymmetry); None: not known
    probe_val_errors: int | None = None     # validation images the linear probe got wrong; None: no probe (yet)
    val_images: int | None = None


@dataclass(frozen=True)
class Choice:
    key: str                          # the template key it sets
    value: Any
    reason: str

    def __str__(self) -> str:
        value = f"{self.value:.4g}" if isinstance(self.value, float) else self.value
        return f"auto {self.key} = {value}: {self.reason}"


def steps_per_epoch(facts: RunFacts, batch_size: int) -> int:
    """Optimizer steps of one epoch (the training loader drops its last incomplete batch)."""
    per_process = math.ceil(facts.train_images / max(1, facts.processes))
    return max(1, per_process // batch_size) if per_process > batch_size else 1


def planned_steps(facts: RunFacts, batch_size: int) -> int:
    return facts.epochs * steps_per_epoch(facts, batch_size)


def is_long(facts: RunFacts, batch_size: int) -> bool:
    return planned_steps(facts, batch_size) >= LONG_RUN_STEPS


def _run_words(facts: RunFacts, batch_size: int) -> str:
    steps = planned_steps(facts, batch_size)
    kind = "long" if steps >= LONG_RUN_STEPS else "short"
    return f"a {kind} run ({steps} steps {'>=' if kind == 'long' else '<'} {LONG_RUN_STEPS})"


def batch_size(facts: RunFacts) -> Choice:
    """The largest power of two up to MAX_BATCH that leaves the run TARGET_STEPS optimizer steps and every
    epoch MIN_STEPS_PER_EPOCH, but not below MIN_BATCH (BatchNorm statistics and device efficiency)."""
    floor = MIN_BATCH.get(facts.device_type, MIN_BATCH["cpu"])
    images = facts.train_images / max(1, facts.processes)
    fit = min(images * facts.epochs / TARGET_STEPS, images / MIN_STEPS_PER_EPOCH)
    b = MAX_BATCH
    while b > floor and b > fit:
        b //= 2
    spe = steps_per_epoch(facts, b)
    return Choice("hyper_parameters.basic.batch_size", b,
                  f"{facts.train_images} training images x {facts.epochs} epochs: {spe} steps per epoch, "
                  f"{spe * facts.epochs} in the run (aim: >= {TARGET_STEPS} and >= {MIN_STEPS_PER_EPOCH} per epoch; "
                  f"batch {floor}..{MAX_BATCH})")


def optimizer(facts: RunFacts, batch: int) -> Choice:
    if is_long(facts, batch):
        return Choice("training.optimizer.name", "sgd", f"{_run_words(facts, batch)}: the published recipe's SGD")
    return Choice("training.optimizer.name", "adamw",
                  f"{_run_words(facts, batch)}: AdamW converges in fewer steps than SGD")


# Learning rates at a reference batch: AdamW 2e-3 at 32 (timm's and Ultralytics' from-scratch settings),
# scaled with the square root of the batch; SGD 0.1 at 256 (Goyal et al.), scaled linearly. Initialised
# backbones get a quarter: they are already near a good solution, and a large first step destroys it.
ADAMW_LR, ADAMW_BATCH = 2e-3, 32
SGD_LR, SGD_BATCH = 0.1, 256
PRETRAINED_LR_FACTOR = 0.25


def learning_rate(facts: RunFacts, optimizer_name: str, batch: int) -> Choice:
    """`batch` is one process's; the rule follows the global batch of all processes."""
    total = batch * max(1, facts.processes)
    words = f"batch {total}" if facts.processes <= 1 else f"global batch {total}"
    if optimizer_name in ("adam", "adamw"):
        lr, rule = ADAMW_LR * math.sqrt(total / ADAMW_BATCH), f"{ADAMW_LR:g} x sqrt({words} / {ADAMW_BATCH})"
    else:
        lr, rule = SGD_LR * total / SGD_BATCH, f"{SGD_LR:g} x {words} / {SGD_BATCH}"
    if facts.pretrained:
        lr, rule = lr * PRETRAINED_LR_FACTOR, f"{rule} x {PRETRAINED_LR_FACTOR:g} (initial weights given)"
    return Choice("hyper_parameters.basic.base_learning_rate", lr, f"{optimizer_name}: {rule}")


def weight_decay(optimizer_name: str) -> Choice:
    if optimizer_name == "adamw":
        return Choice("training.optimizer.weight_decay", 0.05, "adamw: decoupled decay (timm's default scale)")
    return Choice("training.optimizer.weight_decay", 5e-4, f"{optimizer_name}: the published recipe's 5e-4")


def scheduler(facts: RunFacts, batch: int) -> Choice:
    if is_long(facts, batch):
        return Choice("training.scheduler.name", "plateau",
                      f"{_run_words(facts, batch)}: reduce on plateau, as published")
    return Choice("training.scheduler.name", "cosine",
                  f"{_run_words(facts, batch)}: a plateau schedule would not act within it; cosine decays to 0")


def warmup_epochs(facts: RunFacts) -> Choice:
    share, cap = (0.02, 0.5) if facts.pretrained else (0.05, 1.0)
    epochs = round(min(cap, share * facts.epochs), 3)
    why = "initial weights given: short" if facts.pretrained else "from scratch"
    return Choice("training.scheduler.warmup_epochs", epochs,
                  f"{why}: {share:.0%} of the {facts.epochs} epochs, at most {cap:g}")


def costly_technique(key: str, name: str, facts: RunFacts, batch: int) -> Choice:
    """SAM and mutual learning: each doubles the passes per step, paid back only by long runs."""
    if is_long(facts, batch):
        return Choice(key, True, f"{_run_words(facts, batch)}: {name} as published")
    return Choice(key, False, f"{_run_words(facts, batch)}: {name} doubles the cost of a step, which a short "
                              f"run does not recover at equal wall time")


def drop_path_rate(facts: RunFacts, batch: int, architecture_rate: float) -> Choice:
    """Stochastic depth regularises long runs; a short run from scratch is short of steps, not of
    regularisation (measured: domain README, "Defaults that fit the data")."""
    if is_long(facts, batch):
        return Choice("model.drop_path_rate", architecture_rate,
                      f"{_run_words(facts, batch)}: the architecture's stochastic depth")
    return Choice("model.drop_path_rate", 0.0, f"{_run_words(facts, batch)}: no stochastic depth (the "
                                               f"architecture's {architecture_rate:g} slows convergence)")


# What a time budget's epoch costs beyond its training steps (clsengine.budget measures those): an evaluated
# image is a forward pass without gradients, a fifth to a third of a trained one; checkpoints and logs.
EVAL_COST = 0.25
EPOCH_OVERHEAD_S = 0.5


def epochs_for_budget(facts: RunFacts, batch: int, passes_per_step: int, seconds_per_image: float,
                      val_images: int, evaluations: int, budget_s: float, spent_s: float) -> Choice:
    """As many epochs as fit in what is left of the budget (at least 1, at most facts.epochs), from the
    measured cost of a training image; `passes_per_step` counts SAM's second pass and the auxiliary models,
    `evaluations` the models validated each epoch (2 with EMA)."""
    train_s = steps_per_epoch(facts, batch) * batch * passes_per_step * seconds_per_image
    val_s = val_images * evaluations * EVAL_COST * seconds_per_image
    epoch_s = train_s + val_s + EPOCH_OVERHEAD_S
    left = budget_s - spent_s
    epochs = int(max(1, min(facts.epochs, left // epoch_s)))
    capped = f", capped by the {facts.epochs} epochs given" if epochs == facts.epochs and left // epoch_s > epochs else ""
    return Choice("hyper_parameters.basic.epochs", epochs,
                  f"time budget {budget_s:.0f} s, {spent_s:.0f} s spent: {epoch_s:.1f} s per epoch measured "
                  f"({seconds_per_image * 1000:.1f} ms per training image x {passes_per_step} passes: {train_s:.1f} s, "
                  f"validation {val_s:.1f} s){capped}")


def small_input(input_size: tuple[int, int] | list[int]) -> Choice:
    side = min(int(s) for s in input_size)
    on = side < SMALL_INPUT_BELOW
    return Choice("model.small_input", on,
                  f"input {input_size[0]}x{input_size[1]}: " + (
                      f"below {SMALL_INPUT_BELOW} px the last feature map would be 1x1; stem stride 1" if on
                      else f"from {SMALL_INPUT_BELOW} px the standard stem keeps a usable last feature map"))


# A dataset counts as oriented (no horizontal flips) when its class means are this asymmetric and that far
# above the sampling noise: between what digits and photo sets measure (domain README, `training.augmentation.hflip`).
MIRROR_EFFECT = 0.1
MIRROR_VS_NOISE = 4.0
HFLIP_P = 0.5


def hflip(facts: RunFacts) -> Choice:
    """Horizontal flips double a mirror-symmetric dataset for free, and teach wrong labels on an oriented one
    (digits, letters, signs)."""
    key, m = "training.augmentation.hflip", facts.mirror
    if m is None:
        return Choice(key, HFLIP_P, "the orientation of the images is not known (not measured, multi-label, or "
                                    f"too few images per class): flips at {HFLIP_P:g}")
    if m.effect >= MIRROR_EFFECT and m.vs_noise >= MIRROR_VS_NOISE:
        return Choice(key, 0.0, f"{m}: the images have a left and a right (digits, text); no flips")
    return Choice(key, HFLIP_P, f"{m}: mirror-symmetric like photos; flips at {HFLIP_P:g}")


def native_bf16(device_type: str) -> bool:
    """Whether the device has bfloat16 arithmetic in hardware: CUDA (Ampere on), or a CPU with AVX512-BF16 or
    AMX, where oneDNN's bf16 convolutions are fast; elsewhere bf16 is emulated and slower than fp32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_has_avx512() -> bool:
    """AVX-512 CPUs, where oneDNN's channels-last convolutions ran faster at every input size (main README,
    "Speed options")."""
    return bool(getattr(getattr(torch, "cpu", None), "_is_avx512_supported", lambda: False)())


def mixed_precision(device_type: str, bf16_native: bool, depthwise: bool) -> Choice:
    """bf16 autocast where it runs faster (tools/benchmark_speed_options.py; main README, "Speed options"):
    on a CPU with native bfloat16, dense convolutions gain and depthwise ones (MobileNets, EfficientNets)
    lose. On CUDA, bf16 where supported (tensor cores for every layer type)."""
    key = "training.amp"
    if not bf16_native:
        return Choice(key, "none", f"{device_type}: no native bfloat16, full precision")
    if device_type == "cuda":
        return Choice(key, "bf16", "cuda with native bfloat16: bf16 autocast")
    if depthwise:
        return Choice(key, "none", "cpu with native bfloat16, but depthwise convolutions run slower in bf16 "
                                   "there: full precision")
    return Choice(key, "bf16", "cpu with native bfloat16 (AVX512-BF16/AMX) and dense convolutions: bf16 autocast, "
                               "faster there")


# What a light augmentation leaves out of the template's: AugMix and the extra photometric and geometric ops
# (the random resized crop, flips and colour jitter stay). Heavy augmentation regularises long runs; a short run
# is short of passes, not of regularisation (measured: domain README, "Defaults that fit the data").
LIGHT_AUGMENTATION = {"augmix": False, "rotate_p": 0.0, "posterize_p": 0.0, "equalize_p": 0.0, "noise_p": 0.0,
                      "blur_p": 0.0, "cutout_p": 0.0}


def augmentation_level(facts: RunFacts, batch: int) -> Choice:
    if is_long(facts, batch):
        return Choice("training.augmentation_level", "full", f"{_run_words(facts, batch)}: the template's "
                                                             f"augmentation, AugMix included")
    return Choice("training.augmentation_level", "light",
                  f"{_run_words(facts, batch)}: crop, flips and colour jitter only (no AugMix, rotation, posterize, "
                  f"equalize, noise, blur, cutout), which converge faster and load faster")


def lr_finder(facts: RunFacts, batch: int, passes_per_step: int, warmup_epochs: int, lr_pinned: bool,
              mode: str = "fast_ai", trial_cost_epochs: float = 0.0, pinned_on: bool = False) -> list[Choice]:
    """Whether the LR finder runs and how many iterations it takes. `auto` runs it in long runs only (a short
    run's rule-of-thumb rate is safer than a range test of a few dozen noisy steps: on 8000 MNIST digits a
    62-step test chose 7x the AdamW rate and cost 18 points), and only if it costs at most LR_FINDER_BUDGET of
    the training passes: fast_ai: num_iter plain passes (plus the warm-up epochs, dropped if they alone would
    take half the budget); tpe / grid: trial_cost_epochs epochs of plain passes. `pinned_on`: the user asked for
    it; only its iterations are decided."""
    key = "training.lr_finder.enabled"
    if lr_pinned:
        return [Choice(key, False, "the learning rate is given")]
    if not pinned_on and not is_long(facts, batch):
        return [Choice(key, False, f"{_run_words(facts, batch)}: the rule's learning rate, no range test")]
    spe = steps_per_epoch(facts, batch)
    budget = LR_FINDER_BUDGET * planned_steps(facts, batch) * passes_per_step
    if mode != "fast_ai":
        cost = trial_cost_epochs * spe
        if cost > budget:
            return [Choice(key, False, f"{mode} search: {cost:.0f} passes > {LR_FINDER_BUDGET:.0%} of the training "
                                       f"({budget:.0f})")]
        return [Choice(key, True, f"{mode} search: {cost:.0f} passes <= {LR_FINDER_BUDGET:.0%} of the training")]
    warm = warmup_epochs * spe
    choices = []
    if warm > budget / 2:
        warm = 0
        if warmup_epochs:
            choices.append(Choice("training.lr_finder.warmup_epochs", 0,
                                  f"{warmup_epochs} warm-up epoch(s) would take over half of its budget"))
    iters = int(min(LR_FINDER_MAX_ITERS, budget - warm))
    if iters < LR_FINDER_MIN_ITERS:
        return [Choice(key, False, f"its budget ({LR_FINDER_BUDGET:.0%} of {planned_steps(facts, batch)} steps x "
                                   f"{passes_per_step} passes) leaves {max(0, iters)} iterations "
                                   f"(< {LR_FINDER_MIN_ITERS}): it cannot pay")]
    return [Choice(key, True, f"{iters} iterations + {warm} warm-up steps <= {LR_FINDER_BUDGET:.0%} of the "
                              f"training passes"),
            *choices, Choice("training.lr_finder.num_iter", iters, f"{LR_FINDER_BUDGET:.0%} of the training passes, "
                                                                    f"at most {LR_FINDER_MAX_ITERS}")]


# Fine-tuning from initial weights (clsengine.transfer). Measured on held-out photo sets with EfficientNet-Lite0's
# ImageNet weights (domain README, "Starting from ImageNet").
FINETUNE_STAGES = 2           # a short run trains the head and the backbone's last two stages (Lite0: 320 channels
                              # of stage 7 and the 1280-channel head convolution) after the linear probe
FREEZE_BN_BELOW = 5_000       # training images under which BatchNorm keeps ImageNet's statistics
SHOWABLE_GAIN = 5             # validation errors a fine-tuned model must be able to fix to be shown better


def linear_probe(facts: RunFacts, linear_head: bool) -> Choice:
    key = "training.transfer.linear_probe"
    if not facts.pretrained:
        return Choice(key, False, "from scratch: the backbone's features are not trained yet")
    if not linear_head:
        return Choice(key, False, "the probe fits a linear head, and this model has a cosine classifier")
    return Choice(key, True, "initial weights given: the head is fitted on features computed once (seconds), and "
                             "fine-tuning starts from it instead of a random head (LP-FT)")


def trainable_stages(facts: RunFacts, batch: int) -> Choice:
    """Which backbone stages a fine-tuning trains: all of them from scratch and in long runs; in a short run from
    initial weights the last FINETUNE_STAGES only (the earlier stages' general features are kept, and their
    backward pass, most of a step's cost at full resolution, is never computed)."""
    key = "training.transfer.trainable_stages"
    if not facts.pretrained:
        return Choice(key, "all", "from scratch: every layer trains")
    if is_long(facts, batch):
        return Choice(key, "all", f"{_run_words(facts, batch)}: every layer fine-tunes")
    return Choice(key, FINETUNE_STAGES, f"{_run_words(facts, batch)} from initial weights: the head and the last "
                                        f"{FINETUNE_STAGES} backbone stages train, the others keep their weights")


def fine_tune(facts: RunFacts) -> Choice:
    """Whether training goes on after the linear probe. A fine-tuned model replaces the probe's only by scoring
    higher on validation; when the probe leaves fewer than SHOWABLE_GAIN validation errors, no model could be
    shown better there (a sign test on the images the two classify differently: fixing all k of the probe's
    errors and breaking none has chance 0.5^k, above 5% for k < 5), so the choice would be left to chance:
    the probe's model is kept and the run ends (on a 10-species set with 2 errors of 200, fine-tuned models
    that won validation by one or two photos lost up to three of 430 test photos)."""
    key = "training.transfer.fine_tune"
    if not facts.pretrained:
        return Choice(key, True, "from scratch: training is the run")
    if facts.probe_val_errors is None:
        return Choice(key, True, "no linear probe ran: training starts from the initial weights")
    errors, images = facts.probe_val_errors, facts.val_images
    if errors < SHOWABLE_GAIN:
        return Choice(key, False, f"the linear probe leaves {errors} of {images} validation images wrong: a model "
                                  f"fixing all of them would not be shown better (sign test, chance 0.5^{errors} "
                                  f"> 5%), so the probe's model is kept and training ends here")
    return Choice(key, True, f"the linear probe leaves {errors} of {images} validation images wrong: room for "
                             f"fine-tuning to show a better model")


def freeze_bn(facts: RunFacts) -> Choice:
    key = "training.transfer.freeze_bn"
    if not facts.pretrained:
        return Choice(key, False, "from scratch: BatchNorm learns the data's statistics")
    if facts.train_images < FREEZE_BN_BELOW:
        return Choice(key, True, f"initial weights and {facts.train_images} training images (< {FREEZE_BN_BELOW}): "
                                 f"BatchNorm keeps its pretrained statistics, steadier than small batches' own")
    return Choice(key, False, f"initial weights and {facts.train_images} training images: BatchNorm adapts to them")


__all__ = ["AMP_MODES", "AUGMENTATION_LEVELS", "Choice", "FINETUNE_STAGES", "FREEZE_BN_BELOW", "LIGHT_AUGMENTATION",
           "RunFacts", "SHOWABLE_GAIN", "augmentation_level", "batch_size", "costly_technique", "cpu_has_avx512",
           "drop_path_rate", "epochs_for_budget", "fine_tune", "freeze_bn",
           "hflip", "is_long", "learning_rate", "linear_probe", "lr_finder", "mixed_precision", "native_bf16",
           "optimizer", "planned_steps", "scheduler", "small_input", "steps_per_epoch", "trainable_stages",
           "warmup_epochs", "weight_decay"]
