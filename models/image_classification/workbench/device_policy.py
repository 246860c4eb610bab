"""How a template runs on this device: autocast dtype, memory layout, and what torch.compile needs."""
from __future__ import annotations

import os
import shutil

import torch

from clsengine import auto as rules
from clsengine.errors import UserError

from . import auto
from .template import AUTO, Template


def amp_dtype(t: Template, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; 'auto' is decided by auto.resolve (clsengine.auto.mixed_precision) before training."""
    amp = t.training.amp
    if amp == AUTO:
        amp = auto.mixed_precision(t, device.type).value
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("training.amp=fp16 needs a CUDA device; use bf16 on CPU")
        if t.training.optimizer.sam.enabled:
            raise UserError("training.amp=fp16 cannot be combined with SAM (its loss scaling needs one "
                            "step per backward); use training.amp=bf16")
        return torch.float16
    return torch.bfloat16 if amp == "bf16" else None


# Smallest input side from which channels_last ran faster on a CPU without AVX-512 (tools/benchmark_speed_options.py;
# main README, "Speed options").
CHANNELS_LAST_MIN_SIDE_CPU = 128


def memory_format(t: Template, device: torch.device) -> torch.memory_format:
    """Layout of weights and batches in training. `auto`: channels_last on CUDA (cuDNN's NHWC kernels); on an
    AVX-512 CPU at every size (faster there for every template, depthwise networks most); on other CPUs from
    CHANNELS_LAST_MIN_SIDE_CPU pixels up."""
    on = t.training.channels_last
    if on == AUTO:
        on = (device.type == "cuda" or min(t.input.size) >= CHANNELS_LAST_MIN_SIDE_CPU
              or (device.type == "cpu" and rules.cpu_has_avx512()))
    return torch.channels_last if on else torch.contiguous_format


def check_compiler(t: Template) -> None:
    """training.compile needs a C++ compiler for torch.compile's CPU kernels: one clear error before training."""
    if t.training.compile and not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        raise UserError("training.compile: torch.compile needs a C++ compiler (c++, g++ or clang++ on the PATH, "
                        "or $CXX); install one or set training.compile=false")


__all__ = ["CHANNELS_LAST_MIN_SIDE_CPU", "amp_dtype", "check_compiler", "memory_format"]
