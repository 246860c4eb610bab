"""DataLoaders whose shuffling and augmentation randomness depend only on (seed, epoch), so resumed runs match."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


class EpochLoader:
    """Wraps a DataLoader; `loader.set_epoch(e)` reseeds shuffling and worker RNGs for epoch e."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                 drop_last: bool = False, pin_memory: bool = False):
        self.seed = seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        # drop_last on a dataset smaller than one batch would give empty epochs.
        drop_last = drop_last and len(dataset) > batch_size
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                 drop_last=drop_last, pin_memory=pin_memory, generator=self.generator,
                                 persistent_workers=False)

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
