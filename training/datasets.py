"""The labelled-image data-set interface that every format shares, and the lazy data set.

Every data set (:mod:`training.image_folder`, :mod:`training.inat`, :mod:`training.cifar`; picked by
:func:`training.formats.build_datasets`) returns ``(uint8 (C, H, W) tensor, int label)`` and has
``classes`` (names, in label order), ``paths`` (one string per image) and ``labels`` (LongTensor)
attributes, plus the same ``transform``/``cache_transform`` semantics (see
:class:`~training.image_folder.ImageFolderDataset`). :class:`LazyDataset` computes its images on
access (channel statistics of the un-augmented training images, unlabelled folders).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from inference.images import read_image_file


def _min_decode_side(transform) -> int | None:
    """The evaluation transform (``inference.transforms.EvalPreset``) lets JPEGs be decoded reduced to
    its resize size, as the server does; a training transform (random crops) gets full-size images."""
    return getattr(transform, "min_decode_side", None)


class LabelledImages(Dataset):
    """Shared ``__len__``/``__getitem__``/cache logic; subclasses set ``classes``, ``paths``, ``labels``.

    ``cache`` is ``None`` (decode ``paths[i]`` on every access) or a uint8 ``(N, C, H, W)`` tensor.
    """

    classes: list[str]
    paths: list[str]
    labels: torch.Tensor
    transform = None
    cache: torch.Tensor | None = None

    def _build_cache(self, cache_transform, *, progress: bool, desc: str) -> None:
        min_side = _min_decode_side(cache_transform)
        self.cache = torch.stack([cache_transform(read_image_file(p, min_side=min_side))
                                  for p in tqdm(self.paths, desc=desc, disable=not progress, mininterval=1.0)])

    def _load(self, i: int) -> torch.Tensor:
        return read_image_file(self.paths[i], min_side=_min_decode_side(self.transform))

    def read(self, i: int) -> torch.Tensor:
        """Image ``i`` before ``transform``: the cached tensor, or the decoded file."""
        return self.cache[i] if self.cache is not None else self._load(i)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.read(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


class LazyDataset(Dataset):
    """``(load(i), label)`` for ``i < n``: images computed on access (mean/std, unlabelled folders)."""

    def __init__(self, n: int, load, label: int = 0):
        self.n, self.load, self.label = n, load, label

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.load(i), self.label
