"""DataLoaders whose shuffling and augmentation randomness depend only on (seed, epoch), so resumed runs match."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import distributed as dist
from .balance import check_sample_weights


def auto_workers(device_type: str, processes: int = 1) -> int:
    """Loader processes for `training.workers: auto`.

    Training on the CPU, the model already uses every core: loader processes compete with it, and on a
    2-core machine they cost more than they bring (tools/benchmark_pipeline.py; main README, "Training speed").
    So 0 up to 4 cores per training process, 2 beyond. On a GPU the CPU is free for loading: one process per
    spare core, at most 8 per training process.
    """
    cores = max(1, (os.cpu_count() or 1) // max(1, processes))
    if device_type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores <= 4 else 2


class EpochSampler(Sampler[int]):
    """The sample indices of one epoch: shuffled, drawn by weight (with replacement), or in order; in a
    distributed run, this rank's shard of them.

    The order depends only on (seed, epoch), so it is the same on every rank and the shards never overlap.
    Training shards (`pad`) are made equal in length by repeating the first indices, so that every rank takes
    the same number of steps; evaluation shards are not padded, so outputs gathered from the ranks hold each
    image exactly once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, weights: Sequence[float] | None = None,
                 rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.weights = torch.tensor(check_sample_weights(weights, size), dtype=torch.float64) \
            if weights is not None else None
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(self.size, generator=generator)
        return torch.arange(self.size)

    def __iter__(self):
        order = self._order()
        if self.world_size > 1:
            if self.pad:
                total = -(-self.size // self.world_size) * self.world_size
                order = torch.cat([order, order[:total - self.size]])
            order = order[self.rank::self.world_size]
        return iter(order.tolist())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))


class EpochLoader:
    """Wraps a DataLoader; `loader.set_epoch(e)` reseeds the sample order and the worker RNGs for epoch e.

    With `sample_weights` (one per sample, e.g. from data.sample_weights) each epoch draws len(dataset)
    samples with replacement in proportion to the weights instead of shuffling. In a distributed run each
    rank loads its shard of the epoch (EpochSampler) with its own augmentation randomness.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                 drop_last: bool = False, pin_memory: bool = False,
                 sample_weights: Sequence[float] | None = None):
        world = dist.info()
        self.seed, self.rank = seed, world.rank
        self.sampler = EpochSampler(len(dataset), shuffle, seed, sample_weights, world.rank, world.world_size,
                                    pad=shuffle or sample_weights is not None)
        self.generator = torch.Generator()  # worker seeds, hence augmentation
        self.set_epoch(0)
        # drop_last on a shard smaller than one batch would give empty epochs.
        drop_last = drop_last and len(self.sampler) > batch_size
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 drop_last=drop_last, pin_memory=pin_memory, generator=self.generator,
                                 persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed((self.seed * 1000003 + epoch) * 1009 + self.rank)

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
