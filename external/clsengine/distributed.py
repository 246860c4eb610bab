"""Data-parallel training over several processes, as torchrun starts them.

torchrun (or `python -m torch.distributed.run`) sets RANK, LOCAL_RANK and WORLD_SIZE in each process;
`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU). The training loop then wraps its
models in DistributedDataParallel, gives each rank a shard of every epoch (clsengine.data.EpochLoader),
gathers validation outputs from all ranks, so metrics equal those one process computes on the same
weights, and leaves files and logs to rank 0.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """What torchrun told this process (a single process when it did not start it)."""
    try:
        return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                        world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (they are set by torchrun)") from None


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def info() -> DistInfo:
    """This process's place in the initialised process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                        world_size=dist.get_world_size())
    return DistInfo()


def init_from_env(use_cuda: bool, timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun prepared; returns this rank's info and device (cuda:LOCAL_RANK or cpu).

    A single process (no torchrun) gets rank 0 of 1 and no process group.
    """
    env = env_info()
    if not env.enabled:
        return env, torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {env.local_rank} has no CUDA device ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if use_cuda else {}))
    return info(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (CPU, any first-dimension size) concatenated in rank order, on every rank."""
    if not info().enabled:
        return tensor
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def all_sum(*values: float) -> list[float]:
    """Each value summed over the ranks (e.g. a loss total and an image count), on every rank."""
    if not info().enabled:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm statistics drift apart: each rank sees other images)."""
    if not info().enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src)


def broadcast_object(value, src: int = 0):
    """`value` as rank `src` holds it, on every rank (plain Python objects)."""
    if not info().enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` in a distributed run (gradients averaged over ranks), else `model`."""
    if not info().enabled:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


# training.scale_lr: the learning-rate factor for N processes, each taking a batch of batch_size
_LR_FACTORS = {"none": lambda n: 1.0, "linear": lambda n: float(n), "sqrt": lambda n: float(n) ** 0.5}
LR_SCALING = tuple(_LR_FACTORS)


def scale_learning_rate(lr: float, rule: str, world_size: int) -> float:
    """The base LR for `world_size` processes: each takes a batch of batch_size, so the global batch grows
    with the world; `rule` linear (x N) or sqrt (x sqrt N) follows it, none keeps the LR."""
    return lr * _LR_FACTORS[rule](world_size)


__all__ = ["LR_SCALING", "DistInfo", "env_info", "launched_by_torchrun", "info", "init_from_env", "shutdown",
           "barrier", "gather", "all_sum", "broadcast_buffers", "broadcast_object", "scale_learning_rate", "wrap"]
