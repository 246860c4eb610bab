"""Adding classes to a trained model: its weights in a model with more outputs (old head rows kept where the old
classes now stand, new rows left at their fresh initialisation), and the replay sample of the old classes'
images (iCaRL-style exemplars, drawn at random per class). The training itself is Learning without Forgetting:
losses.distillation with the old model as a teacher of its own classes."""
from __future__ import annotations

import random
from typing import Sequence

import torch

from .errors import CheckpointError, UserError


def extend_head_state(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], positions: Sequence[int]
                      ) -> dict[str, torch.Tensor]:
    """`new` (a freshly built model's state dict, with more classes) with every tensor of `old` copied in.

    Tensors of the same shape are copied whole; a tensor whose first dimension is the class count (a linear
    classifier's weight and bias, a cosine classifier's weight) gets row i of `old` at row positions[i] and keeps
    its fresh rows elsewhere. Any other difference means another architecture: one CheckpointError."""
    positions = [int(p) for p in positions]
    n_old, n_new = len(positions), None
    missing = [k for k in new if k not in old]
    unexpected = [k for k in old if k not in new]
    if missing or unexpected:
        raise CheckpointError(f"the old model does not fit the new one: {len(missing)} tensor(s) missing "
                              f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}); "
                              f"another architecture?")
    if len(set(positions)) != n_old:
        raise UserError(f"old class positions repeat: {positions}")
    out = {}
    for key, fresh in new.items():
        value = old[key]
        if value.shape == fresh.shape:
            out[key] = value.clone().to(fresh.dtype)
            continue
        rows_differ = (value.dim() == fresh.dim() and value.dim() >= 1 and value.shape[1:] == fresh.shape[1:]
                       and value.shape[0] == n_old and fresh.shape[0] > n_old)
        if not rows_differ or (n_new is not None and fresh.shape[0] != n_new):
            raise CheckpointError(f"the old model does not fit the new one: {key} {tuple(value.shape)} vs "
                                  f"{tuple(fresh.shape)}")
        n_new = fresh.shape[0]
        if max(positions) >= n_new:
            raise UserError(f"old class position {max(positions)} outside the new {n_new} classes")
        extended = fresh.clone()
        extended[positions] = value.to(fresh.dtype)
        out[key] = extended
    if n_new is None:
        raise CheckpointError("no classifier tensor has the old class count as its rows: nothing to extend")
    return out


def replay_sample(samples: Sequence[tuple[str, int]], classes: Sequence[int], per_class: int | None, seed: int = 0
                  ) -> tuple[list[tuple[str, int]], dict[int, int]]:
    """Up to `per_class` samples of each label in `classes`, drawn at random (fixed `seed`), in the samples' order;
    None: all of them. Returns (chosen samples, {label: images that exist} for each label with fewer than asked)."""
    by_label: dict[int, list[int]] = {int(c): [] for c in classes}
    for i, (_, label) in enumerate(samples):
        if isinstance(label, int) and label in by_label:
            by_label[label].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    short: dict[int, int] = {}
    for label, found in by_label.items():
        if per_class is not None and len(found) < per_class:
            short[label] = len(found)
        chosen += found if per_class is None or len(found) <= per_class else rng.sample(found, per_class)
    return [samples[i] for i in sorted(chosen)], short


__all__ = ["extend_head_state", "replay_sample"]
