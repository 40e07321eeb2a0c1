"""Class-balanced sampling: draw every class equally often, whatever its share of the training set;
and :class:`EpochSampler`, which tags every index with the epoch (seeded per-sample augmentation)."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler, WeightedRandomSampler


def class_balanced_sampler(labels, *, num_samples: int | None = None,
                           generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """Sample with replacement, each index weighted ``1 / frequency of its class``: classes come out equally often."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_balanced_sampler: no labels")
    if int(labels.min()) < 0:
        raise ValueError("class_balanced_sampler: labels must be non-negative class indices")
    counts = torch.bincount(labels).to(torch.float64)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(weights, num_samples=len(labels) if num_samples is None else int(num_samples),
                                 replacement=True, generator=generator)


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for every index of ``sampler``, so that the data set (also in a
    persistent DataLoader worker, which never sees the main process's attributes change) knows the
    epoch: :class:`training.datasets.TrainingImages` seeds each sample's augmentation with it.
    ``set_epoch`` is passed on to ``sampler`` when it has one (``DistributedSampler``)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
