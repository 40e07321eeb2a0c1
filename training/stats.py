"""Channel statistics and normalization: per-channel mean/std of a data set, and ``--normalize`` values.

The mean/std a model is trained with are fused into the exported graph (see
:func:`inference.transforms.normalize`); :func:`parse_normalize` turns ``--normalize`` into them.
"""
from __future__ import annotations

import torch

from .progress import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dataset_stats(dataset, *, max_images: int | None = None, progress: bool = True, bad: list | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of a data set's uint8 images on the 0..1 scale, streamed.

    ``dataset`` is a uint8 ``(N, C, H, W)`` tensor or a data set; of a data set, its ``cache`` (the
    deterministic, pre-augmentation pixels) is used when it has one, else ``dataset[i][0]`` (or
    ``dataset[i]`` when items are bare image tensors). ``max_images`` takes a fixed random subset (seed 0). Sums and sums of squares
    are accumulated in float64, so images may differ in size and nothing is stacked; the std is the
    unbiased one (as torch.std). Items ``(None, label, [(path, reason)])`` (unreadable files,
    :class:`training.datasets.ReadableImages`) are left out, their ``(path, reason)`` added to ``bad``.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset_stats: the data set is empty")
    if max_images is not None and max_images < n:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, not {max_images}")
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images].sort().values.tolist()
    else:
        indices = list(range(n))
    cache = dataset if isinstance(dataset, torch.Tensor) else getattr(dataset, "cache", None)
    if cache is not None and cache.ndim != 4:
        raise ValueError(f"dataset_stats: expected images as (N, C, H, W), got shape {tuple(cache.shape)}")
    total = total_sq = None
    count = 0

    def add(images: torch.Tensor) -> None:  # uint8 (B, C, H, W)
        nonlocal total, total_sq, count
        x = images.to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1)
        if total is None:
            total, total_sq = x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
        elif x.shape[0] != total.shape[0]:
            raise ValueError(f"dataset_stats: images with {total.shape[0]} and {x.shape[0]} channels")
        total += x.sum(1)
        total_sq += x.square().sum(1)
        count += x.shape[1]

    chunk = 256
    bar = tqdm(total=len(indices), desc="channel statistics", disable=not progress, mininterval=1.0)
    for start in range(0, len(indices), chunk):
        idx = indices[start:start + chunk]
        if cache is not None:
            add(cache[idx])
        else:
            for i in idx:
                item = dataset[i]
                image = item if isinstance(item, torch.Tensor) else item[0]
                if image is None:
                    (bad if bad is not None else []).extend(item[2])
                    continue
                if image.ndim != 3:
                    raise ValueError(f"dataset_stats: expected (C, H, W) images, got shape {tuple(image.shape)}")
                add(image.unsqueeze(0))
        bar.update(len(idx))
    bar.close()
    if total is None:
        raise ValueError("dataset_stats: none of the images could be read")
    mean = total / count / 255.0
    var = (total_sq - total.square() / count) / max(1, count - 1) / 255.0 ** 2
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().tolist())


def parse_normalize(value: str, *, dataset_stats_fn) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from ``"dataset"`` (calls ``dataset_stats_fn()``), ``"imagenet"``,
    ``"M1,M2,M3,S1,S2,S3"`` or ``"M,S"`` (one value for all 3 channels); values on the 0..1 scale."""
    text = str(value).strip().lower()
    if text == "dataset":
        mean, std = dataset_stats_fn()
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if text == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    usage = "expected 'dataset', 'imagenet', 'M1,M2,M3,S1,S2,S3' or 'M,S' (0..1 scale)"
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"normalize {value!r}: {usage}") from None
    if len(numbers) == 2:
        numbers = [numbers[0]] * 3 + [numbers[1]] * 3
    if len(numbers) != 6:
        raise ValueError(f"normalize {value!r} has {len(numbers)} numbers; {usage}")
    mean, std = tuple(numbers[:3]), tuple(numbers[3:])
    if not all(0.0 <= m <= 1.0 for m in mean):
        raise ValueError(f"normalize {value!r}: means must lie in 0..1 (pixel values are scaled to 0..1, not 0..255)")
    if not all(0.0 < s <= 1.0 for s in std):
        raise ValueError(f"normalize {value!r}: stds must lie in (0, 1] (pixel values are scaled to 0..1)")
    return mean, std
