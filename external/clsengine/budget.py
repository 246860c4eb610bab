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
import statistics
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .checkpoint import rng_state, set_rng_state
from .errors import UserError
from .models.batchnorm import train_mode
from .utils import autocast

MEASURE_WARMUP_STEPS = 3   # first steps allocate memory and warm caches: not timed
MEASURE_STEPS = 6
PROBE_REFERENCE_BATCH = 16  # probes at larger batches take fewer steps (probe_steps)...
MIN_PROBE_WARMUP, MIN_PROBE_STEPS = 2, 5  # ...but enough for a median


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
                      steps: int = MEASURE_STEPS, warmup: int = MEASURE_WARMUP_STEPS,
                      memory_format: torch.memory_format = torch.contiguous_format,
                      amp_dtype: torch.dtype | None = None) -> float:
    """Wall time of one training image (loading, forward, backward, optimizer step) on this machine, from
    `steps` timed steps of a copy of `model` after `warmup` untimed ones, in the run's layout and autocast
    dtype: the median step, as a shared machine only ever makes a step slower (a 1-warm-up, 2-step probe at
    batch 64 once read 6 ms an image where the training ran at 4). Nothing of the run changes: the copy is
    discarded and every random state is restored."""
    state = rng_state()
    probe = train_mode(copy.deepcopy(model).to(device, memory_format=memory_format))
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-6)
    per_image: list[float] = []
    try:
        batches = iter(loader)
        for i in range(warmup + steps):
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:  # a loader shorter than the probe: start it again
                batches = iter(loader)
                batch = next(batches)
            x = batch[0].to(device, non_blocking=True, memory_format=memory_format)
            y = batch[1].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device.type, amp_dtype):
                logits = probe(x)
            criterion(logits.float(), y).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                per_image.append((time.perf_counter() - started) / max(1, x.shape[0]))
        return statistics.median(per_image)
    finally:
        del probe, optimizer
        set_rng_state(state)


def probe_steps(batch: int, reference_batch: int = PROBE_REFERENCE_BATCH) -> tuple[int, int]:
    """(warm-up, timed) steps for a probe at `batch`: the reference batch's, fewer for larger batches, so that
    every probe reads about as many images (at least MIN_PROBE_WARMUP + MIN_PROBE_STEPS steps)."""
    share = reference_batch / max(batch, reference_batch)
    return (max(MIN_PROBE_WARMUP, round(MEASURE_WARMUP_STEPS * share)),
            max(MIN_PROBE_STEPS, round(MEASURE_STEPS * share)))


def per_image_cost(measured: dict[int, float]) -> Callable[[int], float]:
    """Seconds per training image at any batch, from seconds per image measured at one or more batches. A
    step costs a fixed part (the optimizer, EMA and Python over every parameter, kernel launches) plus a part
    per image, so the cost per image falls with the batch: a line through the two extreme measurements (on
    2 cores, mobilenet_v3_small at 32 px: 5.2 ms per image at batch 16, 2.3 at 64). One measurement:
    the same cost at every batch. Where the two do not fit that model, the measured costs, linear between
    them and flat outside: a step time that fell with the batch (noise), or a cost per image that rose with
    it (at 224 px, where a large batch's activations leave the caches: Lite0 fine-tuning, 9.3 ms per image at
    batch 16, 15.4 at 64; the line through the steps priced batch 16 at 17.5 ms, planning half the epochs)."""
    if len(measured) == 1:
        only = next(iter(measured.values()))
        return lambda batch: only
    lo, hi = min(measured), max(measured)
    per_image = (measured[hi] * hi - measured[lo] * lo) / (hi - lo)
    fixed = measured[lo] * lo - per_image * lo
    if per_image > 0.0 and fixed >= 0.0:
        return lambda batch: per_image + fixed / batch

    def measured_cost(batch: int) -> float:
        if batch <= lo or batch >= hi:
            return measured[lo if batch <= lo else hi]
        return measured[lo] + (measured[hi] - measured[lo]) * (batch - lo) / (hi - lo)
    return measured_cost


__all__ = ["parse_duration", "per_image_cost", "probe_steps", "seconds_per_image"]
