"""Channel statistics and --normalize (training.stats)."""
import pytest
import torch

from inference.transforms import EvalPreset
from training.image_folder import ImageFolderDataset
from training.stats import dataset_stats, parse_normalize


def _reference_stats(images):
    x = torch.stack(images).double().div(255).transpose(0, 1).reshape(3, -1)
    return x.mean(1), x.std(1)


def test_dataset_stats_streams_the_same_numbers_as_stacking(image_folder):
    lazy = ImageFolderDataset(image_folder / "test")
    mean, std = _reference_stats([lazy[i][0] for i in range(len(lazy))])
    got_mean, got_std = dataset_stats(lazy, progress=False)
    assert torch.allclose(torch.tensor(got_mean, dtype=torch.float64), mean, atol=1e-9)
    assert torch.allclose(torch.tensor(got_std, dtype=torch.float64), std, atol=1e-9)
    cached = ImageFolderDataset(image_folder / "test", cache_transform=EvalPreset(crop_size=20), progress=False,
                                transform=lambda x: torch.zeros_like(x))  # stats ignore the (random) transform
    assert torch.allclose(torch.tensor(dataset_stats(cached, progress=False)[0], dtype=torch.float64), mean,
                          atol=1e-9)
    assert dataset_stats(cached.cache, progress=False) == dataset_stats(cached, progress=False)  # a tensor too
    assert torch.equal(cached.read(5), cached.cache[5]) and torch.equal(lazy.read(5), lazy[5][0])
    sub_mean, _ = dataset_stats(cached, max_images=10, progress=False)
    assert sub_mean == dataset_stats(cached, max_images=10, progress=False)[0]  # a fixed subset
    assert sub_mean != tuple(mean.tolist())


def test_dataset_stats_of_images_of_different_sizes():
    class Mixed(torch.utils.data.Dataset):
        images = [torch.full((3, 2, 2), 0, dtype=torch.uint8), torch.full((3, 1, 2), 255, dtype=torch.uint8)]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.images[i], 0

    mean, std = dataset_stats(Mixed(), progress=False)
    assert mean == pytest.approx((1 / 3,) * 3)
    assert std == pytest.approx((float(torch.tensor([0.0] * 4 + [1.0] * 2).std()),) * 3)


def test_parse_normalize():
    calls = []

    def stats():
        calls.append(1)
        return (0.1, 0.2, 0.3), (0.2, 0.2, 0.2)

    assert parse_normalize("dataset", dataset_stats_fn=stats) == ((0.1, 0.2, 0.3), (0.2, 0.2, 0.2)) and calls
    calls.clear()
    assert parse_normalize("imagenet", dataset_stats_fn=stats) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert parse_normalize("0.5,0.4,0.3,0.2,0.25,0.3", dataset_stats_fn=stats) == ((0.5, 0.4, 0.3),
                                                                                    (0.2, 0.25, 0.3))
    assert parse_normalize(" 0.5, 0.25 ", dataset_stats_fn=stats) == ((0.5,) * 3, (0.25,) * 3)
    assert not calls  # only "dataset" computes statistics
    for bad, match in (("cifar", "expected 'dataset'"), ("0.5,0.5,0.5", "3 numbers"),
                       ("128,64", "0..1"), ("0.5,0", r"\(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            parse_normalize(bad, dataset_stats_fn=stats)
