"""Template sections -> the engine's factories: each section's adapter (`*_kwargs`) beside the builder that
calls the factory with it (create_model, create_loss, create_optimizer, create_scheduler, the recipe's parts).
The one place that knows both the template schema and the engine's API."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from clsengine import data as datasets
from clsengine.calibration import Calibration
from clsengine.checkpoint import load_checkpoint, load_model_weights, load_state_dict_file
from clsengine.ema import create_ema
from clsengine.errors import UserError
from clsengine.losses import create_loss
from clsengine.models import am_softmax_scale, backbone_stages, create_model, freeze_stages
from clsengine.optim import create_optimizer, create_scheduler
from clsengine.optim.scheduler import LRSchedule
from clsengine.recipe import Recipe

from . import auto
from .device_policy import amp_dtype, check_compiler, memory_format
from .template import AUTO, LossSection, ModelSection, Template


def input_size(t: Template) -> tuple[int, int]:
    return int(t.input.size[0]), int(t.input.size[1])


def cosine_scale(loss: LossSection, num_classes: int) -> float:
    """The scale shared by a cosine head and its AM-softmax loss."""
    return loss.scale if loss.scale is not None else am_softmax_scale(num_classes)


def model_kwargs(t: Template, m: ModelSection, loss: LossSection, num_classes: int) -> dict[str, Any]:
    """create_model's arguments from a model section (the main model's or an auxiliary one's) and its loss
    (a cosine head shares the AM-softmax loss's scale)."""
    return dict(name=m.architecture, num_classes=num_classes, width_mult=m.width_mult, dropout=m.dropout,
                small_input=auto.small_input(m, t), bn_momentum=m.bn_momentum, head=m.head,
                drop_path_rate=None if m.drop_path_rate == AUTO else m.drop_path_rate,
                cosine_scale=cosine_scale(loss, num_classes))


def loss_kwargs(loss: LossSection, num_classes: int) -> dict[str, Any]:
    """create_loss's arguments from a loss section (class weights come from the data: build_loss)."""
    return dict(name=loss.name, label_smoothing=loss.label_smoothing, scale=cosine_scale(loss, num_classes),
                margin=loss.margin, margin_type=loss.margin_type, asl_gamma_neg=loss.asl_gamma_neg,
                asl_gamma_pos=loss.asl_gamma_pos, asl_clip=loss.asl_clip)


def optimizer_kwargs(t: Template, sam: bool = True) -> dict[str, Any]:
    """create_optimizer's arguments from training.optimizer and the base learning rate; sam=False: the plain
    optimizer SAM would wrap (the LR finder's)."""
    o = t.training.optimizer
    return dict(name=o.name, lr=t.hyper_parameters.basic.base_learning_rate, momentum=o.momentum,
                weight_decay=o.weight_decay, nesterov=o.nesterov, no_bias_decay=o.no_bias_decay,
                sam_rho=o.sam.rho if sam and o.sam.enabled else None, sam_adaptive=o.sam.adaptive)


def scheduler_kwargs(t: Template) -> dict[str, Any]:
    """create_scheduler's arguments (but the optimizer and the steps per epoch) from training.scheduler."""
    s = t.training.scheduler
    return dict(name=s.name, epochs=t.hyper_parameters.basic.epochs, warmup_epochs=s.warmup_epochs,
                warmup_factor=s.warmup_factor, min_lr=s.min_lr, factor=s.factor, patience=s.patience,
                force_decay_at=s.force_decay_at)


def build_model(t: Template, num_classes: int) -> nn.Module:
    """The template's model with fresh weights (initial weights: clsengine.models.load_pretrained)."""
    return create_model(**model_kwargs(t, t.model, t.training.loss, num_classes))


EVAL_BATCH_SIZE = 64  # inference batches of a template whose training batch is left to the run (auto)


def eval_batch_size(t: Template) -> int:
    b = t.hyper_parameters.basic.batch_size
    return EVAL_BATCH_SIZE if b == AUTO else int(b)


def is_multilabel(t: Template) -> bool:
    return t.task.type == "multilabel"


def task_metadata(t: Template) -> dict:
    """How the model's outputs are read; stored in exported files (clsengine.export)."""
    if not is_multilabel(t):
        return {"type": "multiclass"}
    return {"type": "multilabel", "threshold": t.task.threshold, "background_label": t.task.background_label}


def export_kwargs(t: Template, labels: list[str], size: tuple[int, int] | None = None,
                  static_batch: bool | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """clsengine.export's arguments from the template (input, preprocessing, channel order, output_format,
    task), the model's labels and its checkpoint's calibration (None: uncalibrated outputs): every exporter of
    the domain (export.py, compress.py, the benchmarks) reads the template here. `size` (height, width) and
    `static_batch` override the template's (a benchmark timing several batch sizes needs a dynamic batch)."""
    return dict(input_size=size or input_size(t), mean=t.input.mean, std=t.input.std,
                input_order=t.output_format.openvino_input_format, train_order=t.input.channel_order,
                labels=labels, task=task_metadata(t),
                static_batch=t.output_format.static_shape if static_batch is None else static_batch,
                calibration=Calibration.from_dict(calibration))


def class_weights(t: Template, class_counts: list[int] | None) -> torch.Tensor | None:
    """data.class_weights as a tensor (None when off or when no counts are known, e.g. at evaluation)."""
    if class_counts is None:
        return None
    try:
        return datasets.class_weights(class_counts, t.data.class_weights)
    except UserError as exc:
        raise UserError(f"data.class_weights: {exc}") from None


def build_loss(t: Template, num_classes: int, class_counts: list[int] | None = None) -> nn.Module:
    """The template's loss; with training-set `class_counts`, weighted as data.class_weights says."""
    return create_loss(**loss_kwargs(t.training.loss, num_classes), weight=class_weights(t, class_counts))


def build_aux(t: Template, num_classes: int, device: torch.device, class_counts: list[int] | None = None
              ) -> tuple[list[nn.Module], list[nn.Module]]:
    """Mutual-learning partners and their losses (empty lists when mutual learning is off)."""
    ml = t.training.mutual_learning
    if not ml.enabled:
        return [], []
    models = [create_model(**model_kwargs(t, aux.model, aux.loss, num_classes)).to(device) for aux in ml.aux_models]
    weight = class_weights(t, class_counts)
    return models, [create_loss(**loss_kwargs(aux.loss, num_classes), weight=weight).to(device)
                    for aux in ml.aux_models]


def build_recipe(t: Template, model: nn.Module, num_classes: int, device: torch.device,
                 class_counts: list[int] | None = None) -> Recipe:
    """The in-loop parts of the recipe: auxiliary models, mutual loss, EMA and mixed precision, and the memory
    layout, into which `model` is converted here (before its EMA copy is taken)."""
    check_compiler(t)
    layout = memory_format(t, device)
    model.to(memory_format=layout)
    aux_models, aux_criteria = build_aux(t, num_classes, device, class_counts)
    for aux in aux_models:
        aux.to(memory_format=layout)
    ml, ema = t.training.mutual_learning, t.training.ema
    dtype = amp_dtype(t, device)
    return Recipe(aux_models=aux_models, aux_criteria=aux_criteria, mutual_weight=ml.weight,
                  mutual_temperature=ml.temperature, mutual_off_after_epoch=ml.off_after_epoch,
                  multilabel=is_multilabel(t),
                  ema=create_ema(model, ema.decay, ema.warmup) if ema.enabled else None, amp_dtype=dtype,
                  grad_scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
                  memory_format=layout, compile=t.training.compile,
                  mix=datasets.build_batch_mix(t.training.augmentation, num_classes))


def prepare_finetuning(t: Template, model: nn.Module) -> str:
    """Freeze what training.transfer keeps of initial weights (a model trained from scratch trains whole);
    returns the log line."""
    tf = t.training.transfer
    stages = None if tf.trainable_stages in ("all", AUTO) else int(tf.trainable_stages)
    trainable = freeze_stages(model, stages, bool(tf.freeze_bn is True))
    total = len(backbone_stages(model))
    return (f"Fine-tuning: {'every stage' if stages is None else f'the last {min(stages, total)} of {total} stages'}"
            f" and the head train ({trainable} tensors); BatchNorm "
            + ("keeps its pretrained statistics and weights" if tf.freeze_bn is True else "trains"))


def build_optimizer(t: Template, models: nn.Module | list[nn.Module], lr: float | None = None,
                    sam: bool = True) -> torch.optim.Optimizer:
    """The template's optimizer; `lr` replaces the base LR, sam=False gives the plain one (for the LR finder)."""
    kwargs = optimizer_kwargs(t, sam)
    if lr is not None:
        kwargs["lr"] = lr
    return create_optimizer(models, **kwargs)


def build_scheduler(t: Template, optimizer: torch.optim.Optimizer, iters_per_epoch: int) -> LRSchedule:
    return create_scheduler(optimizer, iters_per_epoch=iters_per_epoch, **scheduler_kwargs(t))


def load_aux_weights(aux_models: list[nn.Module], paths: list[str]) -> None:
    """Initial weights of the auxiliary models: one file per model, or one training checkpoint holding them all."""
    if not aux_models:
        raise UserError("--load-aux-weights given but the template trains no auxiliary model "
                        "(training.mutual_learning.enabled is false)")
    if len(paths) == 1:
        checkpoint = load_checkpoint(paths[0])
        if isinstance(checkpoint.get("aux_models"), list):
            states = checkpoint["aux_models"]
            if len(states) != len(aux_models):
                raise UserError(f"{paths[0]} holds {len(states)} auxiliary models, the template trains "
                                f"{len(aux_models)}")
            for model, state in zip(aux_models, states):
                load_model_weights(model, state, f"{paths[0]} (auxiliary model)")
            return
    if len(paths) != len(aux_models):
        raise UserError(f"--load-aux-weights: {len(paths)} file(s) for {len(aux_models)} auxiliary model(s)")
    for model, path in zip(aux_models, paths):
        load_model_weights(model, load_state_dict_file(path), path)


def describe_optimizer(kwargs: dict[str, Any]) -> str:
    """`optimizer_kwargs` in words: the optimizer, and SAM around it."""
    return f"optimizer {kwargs['name']}" + (f"+SAM(rho={kwargs['sam_rho']})" if kwargs["sam_rho"] is not None else "")


def describe_recipe(t: Template, recipe: Recipe) -> str:
    """One line naming the techniques switched on, so a log says what was trained."""
    tr = t.training
    detail = {"am_softmax": f" (m={tr.loss.margin}, {tr.loss.margin_type})",
              "asl": f" (gamma-={tr.loss.asl_gamma_neg:g}, gamma+={tr.loss.asl_gamma_pos:g}, clip={tr.loss.asl_clip:g})"}
    weights = t.data.class_weights
    parts = ["multi-label"] if is_multilabel(t) else []
    parts += [f"loss {tr.loss.name}" + detail.get(tr.loss.name, "")
              + ("" if weights == "none" else f" with class weights ({'auto' if weights == 'auto' else 'given'})"),
              describe_optimizer(optimizer_kwargs(t)), f"scheduler {scheduler_kwargs(t)['name']}"]
    if recipe.aux_models:
        parts.append(f"mutual learning with {len(recipe.aux_models)} auxiliary model(s) "
                     f"({', '.join(a.model.architecture for a in tr.mutual_learning.aux_models)})")
    if recipe.teacher is not None:
        d = tr.distillation
        parts.append(f"distillation (T={d.temperature:g}, weight={d.weight:g}"
                     + (", on the teacher's classes only" if d.teacher_classes == "subset" else "") + ")")
    if recipe.ema is not None:
        parts.append(f"EMA(decay={tr.ema.decay})")
    if t.data.balanced_sampler:
        parts.append("class-balanced sampler")
    if tr.augmentation.augmix:
        parts.append("AugMix")
    aug = tr.augmentation
    for name, alpha in (("MixUp", aug.mixup_alpha), ("CutMix", aug.cutmix_alpha)):
        if alpha > 0 and aug.mix_p > 0:
            parts.append(f"{name}(alpha={alpha:g}, p={aug.mix_p:g})")
    if recipe.amp_dtype is not None:
        parts.append(f"autocast {str(recipe.amp_dtype).removeprefix('torch.')}")
    if recipe.memory_format == torch.channels_last:
        parts.append("channels_last")
    if recipe.compile:
        parts.append("torch.compile")
    return "Recipe: " + ", ".join(parts)


__all__ = ["EVAL_BATCH_SIZE", "build_aux", "build_loss", "build_model", "build_optimizer", "build_recipe", "build_scheduler", "class_weights", "cosine_scale", "describe_optimizer", "describe_recipe", "eval_batch_size", "export_kwargs", "input_size", "is_multilabel", "load_aux_weights", "loss_kwargs", "model_kwargs", "optimizer_kwargs", "prepare_finetuning", "scheduler_kwargs", "task_metadata"]
