"""A time budget instead of a number of epochs: measure what a training step costs here, then plan.

A user who can give a run "three minutes" should not have to know how many epochs that is on their machine:
it depends on the model, the input size, the batch, the device and the recipe (SAM and mutual learning
multiply the passes per step). `seconds_per_image` times a few real training steps (data loading included)
on a copy of the model, leaving the model, the loader's sampler and every random state as they were, so a run
with a budget trains exactly like the same run given its epochs. clsengine.auto.epochs_for_budget turns that
into epochs; the loop's deadline (FitConfig.deadline) stops a run whose estimate was too optimistic.
"""
from __future__ import annotations

import copy
import re
import time
from typing import Iterable

import torch
import torch.nn as nn

from .checkpoint import rng_state, set_rng_state
from .errors import UserError

MEASURE_WARMUP_STEPS = 3   # first steps allocate memory and warm caches: not timed
MEASURE_STEPS = 6


def parse_duration(text: str | float | int) -> float:
    """Seconds from `180`, `180s`, `3m`, `1.5h` (a number alone is seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text))
        if not match:
            raise UserError(f"a duration is a number of seconds or one with s, m or h (180, 3m, 1.5h); got '{text}'")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds <= 0:
        raise UserError(f"a duration must be positive, got {text}")
    return seconds


def seconds_per_image(model: nn.Module, loader: Iterable, criterion: nn.Module, device: torch.device,
                      steps: int = MEASURE_STEPS, warmup: int = MEASURE_WARMUP_STEPS) -> float:
    """Wall time of one training image (loading, forward, backward, optimizer step) on this machine, from
    `steps` timed steps of a copy of `model` after `warmup` untimed ones. Nothing of the run changes: the
    copy is discarded and every random state is restored."""
    state = rng_state()
    probe = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-6)
    images = 0
    started = 0.0
    try:
        batches = iter(loader)
        for i in range(warmup + steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started, images = time.perf_counter(), 0
            try:
                batch = next(batches)
            except StopIteration:  # a loader shorter than the probe: start it again
                batches = iter(loader)
                batch = next(batches)
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            criterion(probe(x), y).backward()
            optimizer.step()
            images += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / max(1, images)
    finally:
        del probe, optimizer
        set_rng_state(state)


__all__ = ["parse_duration", "seconds_per_image"]
