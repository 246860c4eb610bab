"""Seeding and device selection."""
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
    """CUDA when asked for and present, otherwise the CPU. More than one GPU needs a distributed launch."""
    if gpu_num < 0:
        raise UserError(f"gpu_num must be 0 or more, got {gpu_num}")
    if gpu_num > 1:
        raise UserError(f"gpu_num={gpu_num}: multi-GPU training is not supported yet; use --gpu-num 1 or 0")
    if gpu_num >= 1 and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")
