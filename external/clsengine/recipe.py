"""The optional parts of the training recipe that live inside the loop (mutual learning, EMA, mixed precision,
batch mixing, a distillation teacher); checkpoint_saver stores their state (never the teacher's) and loop.fit runs
them. SAM is the optimizer (optim.SAM)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .losses.distillation import Teacher


@dataclass
class Recipe:
    """The optional parts of the recipe that live inside the loop; the defaults give a plain loop.

    SAM needs nothing here: it is the optimizer (optim.SAM), whose steps take two passes.
    """
    aux_models: list[nn.Module] = field(default_factory=list)       # mutual learning partners
    aux_criteria: list[nn.Module] = field(default_factory=list)
    mutual_weight: float = 1.0
    mutual_temperature: float = 1.0
    mutual_off_after_epoch: int | None = None
    ema: nn.Module | None = None                                      # torch AveragedModel of the main model
    amp_dtype: torch.dtype | None = None                              # autocast dtype; None: full precision
    grad_scaler: torch.amp.GradScaler | None = None                   # fp16 only
    multilabel: bool = False                                          # sigmoid outputs: mutual terms per label
    memory_format: torch.memory_format = torch.contiguous_format      # of the batches (the models are converted
                                                                      # by the caller)
    compile: bool = False                                             # fit: training forwards via torch.compile
    mix: Callable | None = None                                       # batch MixUp / CutMix (data.build_batch_mix)
    teacher: Teacher | None = None                                    # fixed distillation teacher of the main
                                                                      # model (losses.distillation); never saved

    def mutual_weight_at(self, epoch: int) -> float:
        """Weight of the mutual term in (0-based) epoch `epoch`."""
        if not self.aux_models or (self.mutual_off_after_epoch is not None and epoch >= self.mutual_off_after_epoch):
            return 0.0
        return self.mutual_weight


__all__ = ["Recipe"]
