"""Model size (millions of parameters) and complexity (GFLOPs, counted as 2 x multiply-accumulates)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int]) -> int:
    """FLOPs of one forward pass on a single image (torch's counter counts a MAC as 2 FLOPs)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, *input_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def complexity(model: nn.Module, input_size: tuple[int, int]) -> dict[str, float]:
    return {"size_mp": count_params(model) / 1e6, "complexity_gflops": count_flops(model, input_size) / 1e9}
