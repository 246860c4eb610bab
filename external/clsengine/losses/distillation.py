"""Knowledge distillation from a fixed teacher (Hinton et al. 2015) and its incremental case, Learning without
Forgetting (Li & Hoiem 2016): the student's logits of the teacher's classes are pulled to the teacher's.

Mutual learning (losses/mutual.py) pulls models towards each other; a fixed teacher is its one-directional case:
the teacher is frozen, in evaluation mode, and never part of the student's checkpoints or exported files (the
loop holds it in Recipe.teacher, which nothing saves).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .mutual import kl_to_target


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      multilabel: bool = False) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch; with `multilabel`, the KL
    of each class's Bernoulli (sigmoid) summed over classes (mutual learning's term, kl_to_target, with one
    fixed side). Zero when the student's logits equal the teacher's; the teacher gets no gradient."""
    if temperature <= 0:
        raise UserError(f"distillation temperature must be positive, got {temperature}")
    return kl_to_target(student, teacher, temperature, multilabel)


def _channel_affine(student_norm: tuple, teacher_norm: tuple) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(channel permutation, scale, shift) turning a batch normalised as `student_norm` (mean, std, channel order;
    mean and std on the 0..255 scale, in that order) into one normalised as `teacher_norm`: undo the student's
    normalisation, reorder RGB <-> BGR, apply the teacher's, in one multiply-add per channel."""
    (s_mean, s_std, s_order), (t_mean, t_std, t_order) = student_norm, teacher_norm
    perm = [s_order.index(c) for c in t_order]           # teacher channel i is student channel perm[i]
    s_mean = torch.tensor([float(s_mean[p]) for p in perm])
    s_std = torch.tensor([float(s_std[p]) for p in perm])
    t_mean, t_std = torch.tensor([float(v) for v in t_mean]), torch.tensor([float(v) for v in t_std])
    return perm, (s_std / t_std).view(1, 3, 1, 1), ((s_mean - t_mean) / t_std).view(1, 3, 1, 1)


def _norm_key(norm: tuple) -> tuple:
    mean, std, order = norm
    return tuple(float(v) for v in mean), tuple(float(v) for v in std), str(order)


class Teacher:
    """A frozen model whose logits on the student's (augmented) batches are a training target.

    The student's batch is turned into the teacher's input (its normalisation, channel order and size: a teacher
    of any template), run without gradients, and `class_index[j]` is the student's logit of the teacher's class j
    (any order; fewer classes for Learning without Forgetting). `loss` is weight x distillation_loss, added to the
    main model's own loss by the training loop. A plain object, not an nn.Module, so that no module attribute and
    no state_dict can carry the teacher into the student's checkpoints.
    """

    def __init__(self, model: nn.Module, class_index: Sequence[int], *, temperature: float = 2.0,
                 weight: float = 1.0, multilabel: bool = False, input_size: Sequence[int] | None = None,
                 student_norm: tuple | None = None, teacher_norm: tuple | None = None) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.class_index = [int(i) for i in class_index]
        self.temperature, self.weight, self.multilabel = float(temperature), float(weight), bool(multilabel)
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.affine = None
        if student_norm is not None and teacher_norm is not None and _norm_key(student_norm) != _norm_key(teacher_norm):
            self.affine = _channel_affine(student_norm, teacher_norm)
        self._index = torch.tensor(self.class_index, dtype=torch.long)
        self._identity = self.class_index == list(range(len(self.class_index)))
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None
        self.memory_format = torch.contiguous_format

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> "Teacher":
        self.model.to(device, memory_format=memory_format)
        self.memory_format = memory_format
        self._index = self._index.to(device)
        if self.affine is not None:
            perm, scale, shift = self.affine
            self.affine = (perm, scale.to(device), shift.to(device))
        return self

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The student's normalised batch as the teacher's preprocessing would have made it."""
        x = images
        if self.affine is not None:
            perm, scale, shift = self.affine
            x = (x[:, perm] if perm != [0, 1, 2] else x) * scale + shift
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            shrink = x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=shrink)
        return x.contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of a student batch (computed once per batch: SAM's second pass reuses them)."""
        if self._cached is not None and self._cached[0] is images:
            return self._cached[1]
        out = self.model(self.inputs(images))
        self._cached = (images, out)
        return out

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """weight x the distillation term between the student's logits of the teacher's classes and the teacher's."""
        s = student_logits if self._identity and student_logits.shape[1] == len(self.class_index) \
            else student_logits.index_select(1, self._index)
        return self.weight * distillation_loss(s, teacher_logits, self.temperature, self.multilabel)

    def release(self) -> None:
        """Forget the last batch (its tensors) once training is over."""
        self._cached = None


__all__ = ["Teacher", "distillation_loss"]
