"""DataLoaders whose shuffling and augmentation randomness depend only on (seed, epoch), so resumed runs match."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from .balance import check_sample_weights


class EpochLoader:
    """Wraps a DataLoader; `loader.set_epoch(e)` reseeds shuffling and worker RNGs for epoch e.

    With `sample_weights` (one per sample, e.g. from data.sample_weights) each epoch draws
    len(dataset) samples with replacement in proportion to the weights instead of shuffling,
    reseeded by set_epoch all the same.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                 drop_last: bool = False, pin_memory: bool = False,
                 sample_weights: Sequence[float] | None = None):
        self.seed = seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        # drop_last on a dataset smaller than one batch would give empty epochs.
        drop_last = drop_last and len(dataset) > batch_size
        sampler = None
        if sample_weights is not None:
            weights = check_sample_weights(sample_weights, len(dataset))
            sampler = WeightedRandomSampler(weights, num_samples=len(dataset), replacement=True,
                                            generator=self.generator)
            shuffle = False  # the sampler decides the order
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                 num_workers=workers, drop_last=drop_last, pin_memory=pin_memory,
                                 generator=self.generator, persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1000003 + epoch)

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
