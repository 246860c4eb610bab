"""training.distillation -> the engine's Teacher: a trained model of any template (its own architecture, input size
and preprocessing) whose logits on the student's batches the student learns from. --add-classes uses the same
teacher with a subset of the classes (Learning without Forgetting, workbench.incremental)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from clsengine.errors import UserError
from clsengine.losses.distillation import Teacher

from . import auto, device_policy, factories
from .classifier import load_training_checkpoint, model_from_checkpoint
from .template import Template

WORK_DIR_CHECKPOINT = Path("outputs") / "best.pth"   # what a work dir given as the teacher stands for


def teacher_checkpoint(spec: str, what: str = "training.distillation.teacher") -> Path:
    """The checkpoint a training.distillation.teacher value names: a file, a work dir (its outputs/best.pth) or an
    output folder (its best.pth); relative paths from the current folder; `what` names the setting in errors. Absolute, so config.yaml and a resumed
    run find it again from anywhere."""
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        found = [p for p in (path / WORK_DIR_CHECKPOINT, path / "best.pth") if p.is_file()]
        if not found:
            raise UserError(f"{what} {spec}: a folder without {WORK_DIR_CHECKPOINT} or "
                            f"best.pth (give a training checkpoint, or a work dir that has trained)")
        return found[0]
    if not path.exists():
        raise UserError(f"{what} {spec} does not exist")
    return path


def class_index(teacher_classes: list[str], classes: list[str], mode: str, source: str) -> list[int]:
    """Position in the student's classes of each of the teacher's classes. `mode` same: the same names (any order);
    subset: the teacher's names all among the student's. Anything else is one UserError naming the difference."""
    missing = [c for c in teacher_classes if c not in classes]            # the teacher knows, the data does not
    unknown = [c for c in classes if c not in teacher_classes]            # the data has, the teacher does not know
    if missing or (mode == "same" and unknown):
        parts = ([f"not in the training data: {', '.join(missing[:10])}"] if missing else []) + (
            [f"unknown to the teacher: {', '.join(unknown[:10])}"] if mode == "same" and unknown else [])
        raise UserError(f"teacher {source}: its classes differ from the training data's ({'; '.join(parts)})")
    return [classes.index(c) for c in teacher_classes]


def load_teacher(path: Path) -> tuple[Template, list[str], torch.nn.Module]:
    """Template, classes and model (eval mode) of a teacher checkpoint; an unusable file is one UserError."""
    checkpoint = load_training_checkpoint(path)
    if not isinstance(checkpoint.get("classes"), list) or not isinstance(checkpoint["config"], dict):
        raise UserError(f"teacher {path}: not a checkpoint written by train.py (no class list)")
    try:
        return model_from_checkpoint(checkpoint, path)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"teacher {path} is not a loadable checkpoint: {type(exc).__name__}: {exc}") from None


def build_teacher(t: Template, classes: list[str], device: torch.device, logger: logging.Logger
                  ) -> tuple[Template, Teacher | None]:
    """The template's teacher on `device` (None when training.distillation is off), and the template with the
    teacher's path made absolute (what config.yaml and the checkpoints record)."""
    d = t.training.distillation
    if not d.enabled:
        return t, None
    path = teacher_checkpoint(d.teacher)
    tt, teacher_classes, model = load_teacher(path)
    if factories.is_multilabel(tt) != factories.is_multilabel(t):
        raise UserError(f"teacher {path} is a {tt.task.type} model; the student is {t.task.type}")
    index = class_index(teacher_classes, classes, d.teacher_classes, str(path))
    teacher = Teacher(model, index, temperature=d.temperature, weight=d.weight, multilabel=factories.is_multilabel(t),
                      input_size=factories.input_size(tt),
                      student_norm=(t.input.mean, t.input.std, t.input.channel_order),
                      teacher_norm=(tt.input.mean, tt.input.std, tt.input.channel_order))
    teacher.to(device, device_policy.memory_format(t, device))
    h, w = factories.input_size(tt)
    logger.info(f"Distillation: teacher {path} ({tt.model.architecture}, {h}x{w}, {len(teacher_classes)} of the "
                f"{len(classes)} classes), temperature {d.temperature:g}, weight {d.weight:g}; frozen, not saved")
    return auto.with_values(t, {"training.distillation.teacher": str(path)}), teacher


__all__ = ["WORK_DIR_CHECKPOINT", "build_teacher", "class_index", "load_teacher", "teacher_checkpoint"]
