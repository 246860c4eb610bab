"""template.yaml: the schema (dataclasses), safe loading with line numbers, validation and overrides.

Every key is declared below with its type and default; an unknown key, a missing required key or a
value of the wrong type is a TemplateError naming the file, the line and the dotted key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from clsengine.auto import AMP_MODES, AUGMENTATION_LEVELS
from clsengine.budget import parse_duration
from clsengine.calibration import REJECTION_SCORES
from clsengine.compression import MODES as COMPRESSION_MODES, OVERFLOW_FIX, PRESETS
from clsengine.data import FORMATS, AugmentationConfig
from clsengine.data.balance import CLASS_WEIGHT_MODES
from clsengine.distributed import LR_SCALING
from clsengine.errors import UserError
from clsengine.fileio import write_text
from clsengine.inference import TARGET_DEVICES
from clsengine.losses import LOSSES, MULTILABEL_LOSSES
from clsengine.losses.am_softmax import MARGIN_TYPES
from clsengine.lr_finder import LR_FINDER_MODES
from clsengine.metadata import CHANNEL_ORDERS
from clsengine.models import HEADS
from clsengine.optim import OPTIMIZERS, SCHEDULERS


# Keys of the historic schema that this one dropped, and what decides instead.
REMOVED_KEYS = {"training_target": "train.py trains on the first CUDA device when there is one (gpu_num, --gpu-num), "
                                   "else on the CPU"}
INFERENCE_TARGETS = ("CPU", "iGPU", "GPU", "NPU")
TASK_TYPES = ("multiclass", "multilabel")


class TemplateError(UserError):
    pass


# ----------------------------------------------------------------------------------------------- schema
@dataclass
class ModelSection:
    architecture: str                       # a name from clsengine.models.list_models()
    width_mult: float = 1.0                 # channel multiplier (MobileNets)
    dropout: float | None = None            # dropout before the classifier; null keeps torchvision's default
    small_input: bool | str = "auto"        # stem stride 1 for inputs like 32x32; auto: below 64 px
    bn_momentum: float | None = None        # BatchNorm momentum; null keeps the architecture's own
    head: str = "linear"                    # linear | cosine (needed by the am_softmax loss)
    drop_path_rate: float | str = "auto"    # stochastic depth (EfficientNets); auto: 0 in short runs


@dataclass
class InputSection:
    size: list[int] = field(default_factory=lambda: [224, 224])                    # height, width
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])   # 0..255 scale
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    channel_order: str = "RGB"              # order of mean/std and of the tensors the network sees


@dataclass
class BasicHyperParameters:
    batch_size: int | str                   # or auto: from the dataset and the epochs (clsengine.auto)
    base_learning_rate: float | str         # or auto: from the optimizer, the batch and initial weights
    epochs: int                             # with time_budget: the most epochs the budget may choose
    time_budget: float | str | None = None  # seconds (or "3m", "1.5h"): the epochs that fit it on this machine


@dataclass
class HyperParameters:
    basic: BasicHyperParameters


@dataclass
class SamSection:
    enabled: bool | str = False             # auto: only in long runs (clsengine.auto)
    rho: float = 0.05                       # radius of the sharpness neighbourhood
    adaptive: bool = False                  # ASAM: neighbourhood scaled by |w|


@dataclass
class OptimizerSection:
    name: str = "auto"                      # sgd | asgd | adam | adamw | auto (adamw in short runs, sgd in long)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | str = "auto"      # auto: 0.05 for adamw, 5e-4 otherwise
    no_bias_decay: bool = True              # no weight decay on biases and normalisation weights
    max_grad_norm: float | None = None      # gradient clipping; null disables it
    sam: SamSection = field(default_factory=SamSection)


@dataclass
class SchedulerSection:
    name: str = "auto"                      # cosine | plateau | constant | auto (cosine in short runs, plateau in long)
    warmup_epochs: float | str = "auto"     # auto: 5% of the epochs, at most 1 (fine-tuning: 2%, at most 0.5)
    warmup_factor: float = 0.1              # warm-up starts at this fraction of the learning rate
    min_lr: float = 0.0
    factor: float = 0.1                     # plateau: LR multiplier on each reduction
    patience: int = 5                       # plateau: epochs without improvement before reducing
    force_decay_at: float | None = 0.75     # plateau: reduce once at this fraction of the epochs if never reduced


@dataclass
class LossSection:
    name: str = "softmax"                   # multiclass: softmax | am_softmax; multilabel: bce | asl
    label_smoothing: float = 0.0
    margin: float = 0.35                    # am_softmax
    margin_type: str = "cos"                # am_softmax: cos | arc
    scale: float | None = None              # am_softmax: null computes max(sqrt(2) ln(C-1), 3)
    asl_gamma_neg: float = 4.0              # asl: focusing of negatives (easy negatives weigh less)
    asl_gamma_pos: float = 0.0              # asl: focusing of positives
    asl_clip: float = 0.05                  # asl: probability shift discarding very easy negatives


@dataclass
class AuxModelSection:
    model: ModelSection
    loss: LossSection = field(default_factory=LossSection)


@dataclass
class MutualLearningSection:
    enabled: bool | str = False             # auto: only in long runs
    weight: float = 1.0                     # weight of the mutual (KL) term
    temperature: float = 1.0
    off_after_epoch: int | None = None      # switch the mutual term off after this epoch
    aux_models: list[AuxModelSection] = field(default_factory=list)


@dataclass
class DistillationSection:
    """A fixed teacher (knowledge distillation; --add-classes makes the old model one: Learning without
    Forgetting). The teacher is frozen and never saved with the student nor exported."""
    enabled: bool = False                   # no auto: at equal wall time the teacher did not pay (domain README)
    teacher: str | None = None              # a training checkpoint, or a work dir (its outputs/best.pth) of any
                                            # template; relative: from the current folder
    temperature: float = 2.0                # softmax / sigmoid temperature T; the term is scaled by T^2
    weight: float = 1.0                     # loss = the template's loss + weight x T^2 x KL(teacher || student)
    teacher_classes: str = "same"           # same: the student's classes (any order) | subset: some of them, the
                                            # student's logits of those are distilled (LwF; set by --add-classes)


@dataclass
class EmaSection:
    enabled: bool = False
    decay: float = 0.999
    warmup: bool = True                     # decay ramps up as min(decay, (1+n)/(10+n))


@dataclass
class LrFinderSection:
    enabled: bool | str = False             # auto: only when it costs at most 5% of the training
    mode: str = "fast_ai"                   # fast_ai (range test) | tpe | grid (optuna)
    min_lr: float = 0.001
    max_lr: float = 0.1
    num_iter: int | str = 100               # fast_ai: iterations of the range test; auto: 5% of the training
    smooth_f: float = 0.01
    warmup_epochs: int = 0                  # fast_ai: train this many epochs first, then restore
    n_trials: int = 15                      # tpe / grid
    trial_epochs: int = 6                   # tpe / grid: epochs per trial
    stop_after: bool = False                # exit after finding the rate


@dataclass
class TransferSection:
    """How initial weights (a snapshot, --load-weights) are used; from scratch, every layer trains."""
    linear_probe: bool | str = "auto"       # fit the linear head on features computed once, before fine-tuning
                                            # (LP-FT); auto: with initial weights and a linear head
    trainable_stages: int | str = "auto"    # backbone stages fine-tuned, counted from the last; all | 0 (the
                                            # probe's head only) | N | auto (clsengine.auto.trainable_stages)
    freeze_bn: bool | str = "auto"          # BatchNorm layers keep their weights and running statistics;
                                            # auto: with initial weights and few images
    fine_tune: bool | str = "auto"          # train after the linear probe; auto: unless the probe leaves too
                                            # few validation errors for a better model to show (clsengine.auto)


@dataclass
class TrainingSection:
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    loss: LossSection = field(default_factory=LossSection)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)  # engine's own schema
    augmentation_level: str = "auto"        # full (the section above) | light (no AugMix nor extra ops) |
                                            # auto (light in short runs, full in long ones)
    ema: EmaSection = field(default_factory=EmaSection)
    mutual_learning: MutualLearningSection = field(default_factory=MutualLearningSection)
    distillation: DistillationSection = field(default_factory=DistillationSection)
    lr_finder: LrFinderSection = field(default_factory=LrFinderSection)
    amp: str = "auto"                       # none | bf16 | fp16 | auto: see device_policy.amp_dtype
    channels_last: bool | str = "auto"      # NHWC weights and batches; auto: see device_policy.memory_format
    compile: bool = False                   # torch.compile the training forward passes (minutes to compile)
    early_stopping_patience: int | None = None
    freeze_backbone: bool = False
    transfer: TransferSection = field(default_factory=TransferSection)
    seed: int = 5
    deterministic: bool = False
    workers: int | str = "auto"             # data-loading processes; auto: see clsengine.data.auto_workers
    scale_lr: str = "none"                  # several processes: none | linear (LR x N) | sqrt (LR x sqrt N)


@dataclass
class Metric:
    display_name: str
    key: str                                # size | complexity | accuracy | ...
    unit: str
    value: float


@dataclass
class OutputFormat:
    onnx: bool = True
    openvino: bool = True
    openvino_input_format: str = "BGR"
    static_shape: bool = False              # export with a fully static input [1, 3, H, W] (NPU toolchains)


@dataclass
class CompressionSection:
    """Int8 quantization by compress.py: NNCF post-training quantization of the float IR (OpenVINO backend),
    then (mode auto) quantization-aware fine-tuning (PyTorch) only while the int8 IR misses the accuracy budget."""
    mode: str = "auto"                      # auto: QAT only when PTQ misses the budget | ptq: never | qat: always
    max_accuracy_drop: float = 1.0          # top-1 points the int8 model may lose against the float one
    calibration_subset: int = 300           # training images used to calibrate activation ranges
    preset: str = "performance"             # performance (symmetric) | mixed (asymmetric activations)
    fast_bias_correction: bool = True
    overflow_fix: str = "enable"            # enable | first_layer | disable: 7-bit weights for CPUs without VNNI
    ignored_scope: list[str] = field(default_factory=list)   # regexes of operation names kept in float
    int8_onnx: bool = False                 # also an int8 ONNX (NNCF's PyTorch backend) for other runtimes
    qat_epochs: int | None = None           # null: computed from the dataset size (clsengine.compression.qat_epochs)
    qat_lr_factor: float = 0.01             # fine-tuning LR = base_learning_rate x this


@dataclass
class CalibrationSection:
    """Scores a user can act on (clsengine.calibration), fitted on the validation set after training and
    stored in best.pth: a temperature, per-class thresholds (multi-label), an "unknown" threshold."""
    enabled: bool = True                    # fit after training (eval.py --calibrate refits on other data)
    rejection_score: str = "energy"         # single-label "unknown" score: energy | max_prob | none
    keep: float = 0.95                      # share of correct validation answers kept above the unknown threshold
    target_precision: float | None = None   # multi-label thresholds: null: best F1 per class; else the lowest
                                            # threshold reaching this precision


@dataclass
class TaskSection:
    type: str = "multiclass"                # multiclass (one label per image, softmax) | multilabel (sigmoid)
    threshold: float = 0.5                  # multilabel: a label is predicted when its probability reaches this
    background_label: str | None = None     # multilabel: class zeroed whenever another label is predicted


@dataclass
class DataSection:
    """How datasets are read and balanced; every key also has a train.py flag."""
    format: str = "auto"                    # auto | folders | list | coco (auto: from the annotation file given)
    category_map: str | None = None         # COCO: JSON {category_id: logit}; relative to the work dir
    classes: list[str] = field(default_factory=list)    # train on these classes only (empty: all)
    class_weights: str | list[float] = "none"           # none | auto (inverse frequency) | one weight per class
    balanced_sampler: bool = False          # draw training images so every class is seen equally often
    cache_mb: int = 1024                    # a dataset whose decoded images fit in this many MiB is decoded
                                            # once and kept in memory (0: decode every epoch)


@dataclass
class HpoSection:
    """optimize.py: an optuna search whose best parameters go to WORK_DIR/hpo_best.yaml for train.py."""
    learning_rate: list[float] | None = None    # log-uniform [low, high]; null: base_learning_rate / 10 .. x 10
    weight_decay: list[float] = field(default_factory=lambda: [1e-5, 1e-3])   # log-uniform [low, high]
    batch_size: list[int] = field(default_factory=list)   # choices; empty: keep hyper_parameters.basic.batch_size
    epochs_per_trial: int | None = None         # null: a fifth of hyper_parameters.basic.epochs (at least 1)
    time_budget: float = 1.0                    # the search's time as a ratio of one normal training run
    n_trials: int = 20                          # at most this many trials per optimize.py run


@dataclass
class Snapshot:
    location: str                           # URL, path (relative: to the template) or package://MODULE/PATH
    sha256: str
    size: int
    package: str | None = None              # package://: the pip package that installs MODULE (for errors)


@dataclass
class Template:
    name: str
    domain: str
    problem: str
    framework: str
    summary: str
    model: ModelSection
    hyper_parameters: HyperParameters
    input: InputSection = field(default_factory=InputSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    metrics: list[Metric] = field(default_factory=list)
    output_format: OutputFormat = field(default_factory=OutputFormat)
    compression: CompressionSection = field(default_factory=CompressionSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    hpo: HpoSection = field(default_factory=HpoSection)
    snapshot: Snapshot | None = None
    gpu_num: int = 1
    inference_target: list[str] = field(default_factory=lambda: ["CPU", "iGPU"])   # devices export.py checks on
    tensorboard: bool = True

    def metric(self, key: str) -> Metric | None:
        return next((m for m in self.metrics if m.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe types (tuples become lists)."""
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value
        return plain(dataclasses.asdict(self))


# ------------------------------------------------------------------------------------- loading with lines
def _line_map(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line number, from the YAML node tree."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}[{i}]"
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return lines


class _Validator:
    def __init__(self, source: str, lines: dict[str, int], overridden: set[str] = frozenset()):
        self.source = source
        self.lines = lines
        self.overridden = overridden

    def where(self, path: str) -> str:
        """'file:line' of the innermost key of `path` that has a position (or the override that set it)."""
        probe = path
        while probe:
            if probe in self.overridden:
                return f"{self.source} (command-line override {probe})"
            if probe in self.lines:
                return f"{self.source}:{self.lines[probe]}"
            probe = probe[:probe.rindex("[")] if probe.endswith("]") else probe.rpartition(".")[0]
        return self.source

    def fail(self, path: str, message: str) -> TemplateError:
        return TemplateError(f"{self.where(path)}: {message}")

    def build(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            raise self.fail(path, f"'{path or 'template'}' must be a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                dotted = f"{path}.{key}" if path else str(key)
                if dotted in REMOVED_KEYS:
                    raise self.fail(dotted, f"'{dotted}' is no longer a template key: {REMOVED_KEYS[dotted]}; delete it")
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(fields)})"
                raise self.fail(dotted, f"unknown key '{dotted}'{hint}")
        kwargs = {}
        for name, f in fields.items():
            dotted = f"{path}.{name}" if path else name
            if name in data:
                kwargs[name] = self.value(hints[name], data[name], dotted)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.fail(path, f"missing required key '{dotted}'")
        return cls(**kwargs)

    def value(self, tp: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            for alternative in inner[:-1]:  # the first alternative the value fits, e.g. str | list[float]
                try:
                    return self.value(alternative, value, path)
                except TemplateError:
                    pass
            return self.value(inner[-1], value, path)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)
        if origin is tuple:
            item_types = typing.get_args(tp)
            if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
                raise self.fail(path, f"'{path}' must be a list of {len(item_types)} values, got {value!r}")
            return tuple(self.value(it, v, f"{path}[{i}]") for i, (it, v) in enumerate(zip(item_types, value)))
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, list):
                raise self.fail(path, f"'{path}' must be a list, got {value!r}")
            return [self.value(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if tp is bool:
            if not isinstance(value, bool):
                raise self.fail(path, f"'{path}' must be true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(path, f"'{path}' must be an integer, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(path, f"'{path}' must be a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.fail(path, f"'{path}' must be a string, got {value!r}")
            return value
        raise TypeError(f"unsupported schema type {tp} at {path}")


AUTO = "auto"  # the value that leaves a key to the run (workbench.auto, rules in clsengine.auto)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_duration(value: Any) -> bool:
    if value is None:
        return True
    try:
        parse_duration(value)
    except UserError:
        return False
    return True


def _auto_or(value: Any, check) -> bool:
    """`auto`, or a concrete value passing `check` (a string other than auto never passes)."""
    if isinstance(value, str):
        return value == AUTO
    return bool(check(value))


def _lookup(t: Template, path: str) -> Any:
    """The value at a dotted path such as 'training.mutual_learning.aux_models[0].loss.name'."""
    node: Any = t
    for part in path.replace("]", "").split("."):
        name, _, index = part.partition("[")
        node = getattr(node, name)
        if index:
            node = node[int(index)]
    return node


def _one_of(names) -> str:
    return f"one of {', '.join(map(str, names))}"


def _check_semantics(t: Template, v: _Validator) -> None:
    """Constraints a type alone cannot express; names are checked against the engine's own lists."""
    from clsengine.models import list_models

    for model_path, model in [("model", t.model)] + [(f"training.mutual_learning.aux_models[{i}].model", aux.model)
                                                     for i, aux in enumerate(t.training.mutual_learning.aux_models)]:
        if model.architecture not in list_models():
            raise v.fail(f"{model_path}.architecture", f"unknown architecture '{model.architecture}' "
                                                      f"(known: {', '.join(list_models())})")
    for path, ok, expected in [*_input_checks(t), *_training_checks(t), *_head_checks(t), *_other_checks(t)]:
        if not ok:
            raise v.fail(path, f"'{path}' must be {expected}, got {_lookup(t, path)!r}")
    try:
        aug = t.training.augmentation
        (dataclasses.replace(aug, hflip=0.5) if aug.hflip == AUTO else aug).validate()  # auto: workbench.auto
    except UserError as exc:
        raise v.fail(f"training.augmentation.{exc.field}", f"training.{exc}") from None


Check = tuple[str, bool, str]  # (dotted key, whether its value is valid, what it must be)


def _input_checks(t: Template) -> list[Check]:
    basic = t.hyper_parameters.basic
    return [
        ("input.size", len(t.input.size) == 2 and all(s >= 8 for s in t.input.size), "two sizes >= 8 [height, width]"),
        ("input.mean", len(t.input.mean) == 3, "three values"),
        ("input.std", len(t.input.std) == 3 and all(s > 0 for s in t.input.std), "three positive values"),
        ("input.channel_order", t.input.channel_order in CHANNEL_ORDERS, " or ".join(CHANNEL_ORDERS)),
        ("hyper_parameters.basic.batch_size", _auto_or(basic.batch_size, lambda v: v >= 1),
         "auto or an integer of at least 1"),
        ("hyper_parameters.basic.epochs", basic.epochs >= 1, "at least 1"),
        ("hyper_parameters.basic.time_budget", _is_duration(basic.time_budget),
         "null or a positive duration: seconds, or a number with s, m or h (180, 3m, 1.5h)"),
        ("hyper_parameters.basic.base_learning_rate", _auto_or(basic.base_learning_rate, lambda v: v > 0),
         "auto or a positive number"),
    ]


def _training_checks(t: Template) -> list[Check]:
    tr = t.training
    tf = tr.transfer
    flags = [("training.optimizer.sam.enabled", tr.optimizer.sam.enabled),
             ("training.mutual_learning.enabled", tr.mutual_learning.enabled),
             ("training.lr_finder.enabled", tr.lr_finder.enabled), ("training.transfer.linear_probe", tf.linear_probe),
             ("training.transfer.freeze_bn", tf.freeze_bn), ("training.transfer.fine_tune", tf.fine_tune),
             ("training.channels_last", tr.channels_last)]
    return [(key, _auto_or(value, _is_bool), "true, false or auto") for key, value in flags] + [
        ("training.optimizer.name", tr.optimizer.name in (AUTO, *OPTIMIZERS), _one_of((AUTO, *OPTIMIZERS))),
        ("training.optimizer.weight_decay", _auto_or(tr.optimizer.weight_decay, lambda v: v >= 0), "auto or 0 or more"),
        ("training.scheduler.name", tr.scheduler.name in (AUTO, *SCHEDULERS), _one_of((AUTO, *SCHEDULERS))),
        ("training.scheduler.warmup_epochs", _auto_or(tr.scheduler.warmup_epochs, lambda v: v >= 0),
         "auto or 0 or more"),
        ("training.transfer.trainable_stages", tf.trainable_stages in (AUTO, "all") or (
            type(tf.trainable_stages) is int and tf.trainable_stages >= 0), "auto, all or an integer of at least 0"),
        ("training.lr_finder.num_iter", _auto_or(tr.lr_finder.num_iter, lambda v: v >= 1), "auto or at least 1"),
        ("training.optimizer.sam.rho", tr.optimizer.sam.rho >= 0, "0 or more"),
        ("training.ema.decay", 0 < tr.ema.decay < 1, "between 0 and 1"),
        ("training.augmentation_level", tr.augmentation_level in (AUTO, *AUGMENTATION_LEVELS),
         _one_of((AUTO, *AUGMENTATION_LEVELS))),
        ("training.amp", tr.amp in (*AMP_MODES, AUTO), _one_of((*AMP_MODES, AUTO))),
        ("training.lr_finder.mode", tr.lr_finder.mode in LR_FINDER_MODES, _one_of(LR_FINDER_MODES)),
        ("training.lr_finder.max_lr", 0 < tr.lr_finder.min_lr < tr.lr_finder.max_lr,
         "greater than training.lr_finder.min_lr (both positive)"),
        ("training.mutual_learning.aux_models", tr.mutual_learning.enabled is False or tr.mutual_learning.aux_models,
         "a non-empty list when mutual learning is enabled"),
        *_distillation_checks(tr.distillation),
        ("training.workers", tr.workers == AUTO or (isinstance(tr.workers, int) and tr.workers >= 0),
         "auto or 0 or more"),
        ("training.scale_lr", tr.scale_lr in LR_SCALING, _one_of(LR_SCALING)),
        ("training.augmentation.mixup_alpha", not (t.task.type == "multilabel" and tr.augmentation.mixes),
         "0 for task.type multilabel (as training.augmentation.cutmix_alpha): MixUp and CutMix take one label "
         "per image"),
    ]


TEACHER_CLASSES = ("same", "subset")


def _distillation_checks(d: DistillationSection) -> list[Check]:
    key = "training.distillation"
    return [(f"{key}.teacher", not d.enabled or bool(d.teacher),
             "a checkpoint or a work dir when training.distillation.enabled is true"),
            (f"{key}.temperature", d.temperature > 0, "positive"),
            (f"{key}.weight", d.weight >= 0, "0 or more"),
            (f"{key}.teacher_classes", d.teacher_classes in TEACHER_CLASSES, " or ".join(TEACHER_CLASSES))]


def _head_checks(t: Template) -> list[Check]:
    """The main model's and each auxiliary model's architecture options and loss."""
    multilabel = t.task.type == "multilabel"
    loss_names = MULTILABEL_LOSSES if multilabel else tuple(n for n in LOSSES if n not in MULTILABEL_LOSSES)
    heads = [("model", t.model, "training.loss", t.training.loss)] + [
        (f"training.mutual_learning.aux_models[{i}].model", aux.model,
         f"training.mutual_learning.aux_models[{i}].loss", aux.loss)
        for i, aux in enumerate(t.training.mutual_learning.aux_models)]
    checks = []
    for model_path, model, loss_path, loss in heads:
        checks += [
            (f"{model_path}.small_input", _auto_or(model.small_input, _is_bool), "true, false or auto"),
            (f"{model_path}.drop_path_rate", _auto_or(model.drop_path_rate, lambda r: 0 <= r < 1),
             "auto or a number from 0 to below 1"),
            (f"{model_path}.head", model.head in HEADS, " or ".join(HEADS)),
            (f"{loss_path}.name", loss.name in loss_names, f"{' or '.join(loss_names)} for task.type {t.task.type}"),
            (f"{loss_path}.asl_clip", 0 <= loss.asl_clip < 1, "between 0 and 1"),
            (f"{loss_path}.asl_gamma_neg", loss.asl_gamma_neg >= 0 and loss.asl_gamma_pos >= 0,
             "0 or more (as asl_gamma_pos)"),
            (f"{loss_path}.margin_type", loss.margin_type in MARGIN_TYPES, " or ".join(MARGIN_TYPES)),
            (f"{loss_path}.name", loss.name != "am_softmax" or model.head == "cosine",
             f"softmax unless {model_path}.head is cosine (am_softmax needs a cosine head)"),
        ]
    return checks


def _other_checks(t: Template) -> list[Check]:
    c, hpo = t.compression, t.hpo
    return [
        ("compression.max_accuracy_drop", c.max_accuracy_drop >= 0, "0 or more"),
        ("compression.calibration_subset", c.calibration_subset >= 1, "at least 1"),
        ("compression.preset", c.preset in PRESETS, " or ".join(PRESETS)),
        ("compression.overflow_fix", c.overflow_fix in OVERFLOW_FIX, _one_of(OVERFLOW_FIX)),
        ("compression.qat_epochs", c.qat_epochs is None or c.qat_epochs >= 0, "0 or more (null: computed)"),
        ("compression.mode", c.mode in COMPRESSION_MODES, _one_of(COMPRESSION_MODES)),
        ("compression.qat_epochs", c.mode != "qat" or c.qat_epochs != 0,
         "at least 1 when compression.mode is qat (null: computed)"),
        ("compression.qat_lr_factor", c.qat_lr_factor > 0, "positive"),
        ("calibration.rejection_score", t.calibration.rejection_score in (*REJECTION_SCORES, "none"),
         _one_of((*REJECTION_SCORES, "none"))),
        ("calibration.keep", 0 < t.calibration.keep <= 1, "in (0, 1]"),
        ("calibration.target_precision", t.calibration.target_precision is None
         or 0 < t.calibration.target_precision <= 1, "null or in (0, 1]"),
        ("hpo.learning_rate", hpo.learning_rate is None or (len(hpo.learning_rate) == 2
                                                            and 0 < hpo.learning_rate[0] <= hpo.learning_rate[1]),
         "null or [low, high] with 0 < low <= high"),
        ("hpo.weight_decay", len(hpo.weight_decay) == 2 and 0 < hpo.weight_decay[0] <= hpo.weight_decay[1],
         "[low, high] with 0 < low <= high"),
        ("hpo.batch_size", all(b >= 1 for b in hpo.batch_size), "a list of batch sizes >= 1"),
        ("hpo.epochs_per_trial", hpo.epochs_per_trial is None or hpo.epochs_per_trial >= 1, "null or at least 1"),
        ("hpo.time_budget", hpo.time_budget > 0, "positive"),
        ("inference_target", bool(t.inference_target) and all(str(d).upper() in TARGET_DEVICES
                                                               for d in t.inference_target),
         f"a non-empty list of {', '.join(INFERENCE_TARGETS)}"),
        ("hpo.n_trials", hpo.n_trials >= 1, "at least 1"),
        ("gpu_num", t.gpu_num >= 0, "0 or more"),
        ("output_format.openvino_input_format", t.output_format.openvino_input_format in CHANNEL_ORDERS,
         " or ".join(CHANNEL_ORDERS)),
        ("task.type", t.task.type in TASK_TYPES, " or ".join(TASK_TYPES)),
        ("task.threshold", 0 < t.task.threshold < 1, "between 0 and 1"),
        ("task.background_label", t.task.background_label is None or t.task.type == "multilabel",
         "null unless task.type is multilabel (background suppression is a multi-label feature)"),
        ("data.format", t.data.format in FORMATS, _one_of(FORMATS)),
        ("data.class_weights", not isinstance(t.data.class_weights, str) or t.data.class_weights in CLASS_WEIGHT_MODES,
         f"{', '.join(CLASS_WEIGHT_MODES)} or a list of numbers (one per class)"),
        ("data.classes", len(set(t.data.classes)) == len(t.data.classes), "a list without repeated names"),
        ("data.cache_mb", t.data.cache_mb >= 0, "0 or more"),
    ]


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set data['a']['b'] for 'a.b', creating intermediate mappings."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise TemplateError(f"override '{dotted}': '{part}' is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'training.optimizer.name=adamw' -> ('training.optimizer.name', 'adamw'); values are YAML scalars/lists."""
    if "=" not in text:
        raise TemplateError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise TemplateError(f"override '{text}': empty key")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise TemplateError(f"override '{text}': value is not valid YAML") from None


def load_template(path: str | Path, overrides: dict[str, Any] | None = None) -> Template:
    """Parse, apply dotted overrides and validate; every problem is one TemplateError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"template {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TemplateError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        raise TemplateError(f"{path}: the template is empty")
    return template_from_dict(data, str(path), overrides, lines)


def template_from_dict(data: Any, source: str, overrides: dict[str, Any] | None = None,
                       lines: dict[str, int] | None = None) -> Template:
    """Validate a template mapping (from a file, or the config stored in a checkpoint)."""
    validator = _Validator(source, lines or {}, set(overrides or {}))
    if not isinstance(data, dict):
        raise validator.fail("", "the template must be a mapping of keys")
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    template = validator.build(Template, data, "")
    _check_semantics(template, validator)
    return template


def dump_config(config: dict[str, Any], path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(config, sort_keys=False))
