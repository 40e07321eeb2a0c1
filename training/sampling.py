"""Class-balanced sampling: draw every class equally often, whatever its share of the training set."""
from __future__ import annotations

import torch
from torch.utils.data import WeightedRandomSampler


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
