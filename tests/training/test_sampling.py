"""Class-balanced sampling (training.sampling)."""
import torch

from training.sampling import class_balanced_sampler


def test_class_balanced_sampler_draws_classes_equally():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2])
    sampler = class_balanced_sampler(labels, num_samples=6000, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler) and len(sampler) == 6000
    assert torch.allclose(sampler.weights[[0, 90, 99]], torch.tensor([1 / 90, 1 / 9, 1.0], dtype=torch.float64))
    freq = torch.bincount(labels[list(sampler)], minlength=3) / 6000
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)
    assert len(class_balanced_sampler([1, 1, 0])) == 3
