"""Seeding, device selection and mixed precision on demand."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import UserError


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def select_device(gpu_num: int) -> torch.device:
    """The device of a single-process run: the first CUDA device when GPUs are asked for and present, else
    the CPU. (Several processes, one per GPU, are train.py's business: clsengine.distributed.)"""
    if gpu_num < 0:
        raise UserError(f"gpu_num must be 0 or more, got {gpu_num}")
    if gpu_num >= 1 and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """torch.autocast to `dtype`, or a context that changes nothing when `dtype` is None (full precision):
    the one form every forward of training, validation and the budget's timing steps uses."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
