"""The data-set formats and :func:`build_datasets`: which format a data folder is, and its train/test sets.

* ``imagefolder`` (:mod:`training.image_folder`): ``DATA/train`` and ``DATA/test`` (or ``DATA/val``);
* ``inat`` (:mod:`training.inat`): ``DATA/train.json`` and ``DATA/val.json`` (or ``DATA/test.json``);
* ``cifar`` (:mod:`training.cifar`): a folder of CIFAR-10/100 python pickles.

:data:`FORMATS` is the list the command line offers (``--format``, with ``auto``: :func:`detect_format`).
"""
from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from .cifar import CIFAR_SUBFOLDERS, CifarDataset, is_cifar_folder
from .image_folder import ImageFolderDataset
from .inat import InatDataset

FORMATS = ("imagefolder", "inat", "cifar")
AUTO = "auto"
FORMAT_CHOICES = (AUTO, *FORMATS)  # what build_datasets(format=...) accepts


def detect_format(data: str | os.PathLike) -> str:
    """``"inat"`` (``train.json``), ``"cifar"`` (CIFAR pickles) or ``"imagefolder"`` (``train/`` folder)."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    if (root / "train.json").is_file():
        return "inat"
    if is_cifar_folder(root):
        return "cifar"
    if (root / "train").is_dir():
        return "imagefolder"
    raise ValueError(f"cannot tell the format of {data}: looked for train.json (iNaturalist), CIFAR pickles "
                     f"(data_batch_1/test_batch or train/test files, also under {' or '.join(CIFAR_SUBFOLDERS)}) "
                     "and a train/ sub-folder (ImageFolder)")


def _first(root: Path, names: tuple[str, ...], is_ok, what: str) -> Path:
    for name in names:
        if is_ok(root / name):
            return root / name
    raise FileNotFoundError(f"{root} has none of the {what} {', '.join(names)}")


def build_datasets(data: str | os.PathLike, *, format: str = AUTO, train_transform=None, eval_transform=None,
                   cache_transform=None, progress: bool = True) -> tuple[Dataset, Dataset]:
    """``(train_ds, test_ds)`` of a data folder.

    * ``imagefolder``: ``data/train`` and ``data/test`` (or ``data/val``);
    * ``inat``: ``data/train.json`` and ``data/val.json`` (or ``data/test.json``), images relative to ``data``;
    * ``cifar``: a folder of CIFAR-10/100 pickles (see :class:`CifarDataset`).

    ``train_transform`` and ``eval_transform`` run on every access of the train and test set;
    ``cache_transform`` (both sets) as in :class:`ImageFolderDataset`. Both sets must have the same classes.
    """
    root = Path(data)
    if format == AUTO:
        format = detect_format(root)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected {AUTO} or one of {', '.join(FORMATS)}")
    common = dict(cache_transform=cache_transform, progress=progress)
    if format == "imagefolder":
        train_dir = _first(root, ("train",), Path.is_dir, "sub-folders")
        test_dir = _first(root, ("test", "val"), Path.is_dir, "sub-folders")
        train_ds = ImageFolderDataset(train_dir, transform=train_transform, **common)
        test_ds = ImageFolderDataset(test_dir, transform=eval_transform, **common)
        train_name, test_name = train_dir, test_dir
    elif format == "inat":
        train_name = _first(root, ("train.json",), Path.is_file, "files")
        test_name = _first(root, ("val.json", "test.json"), Path.is_file, "files")
        train_ds = InatDataset(train_name, root=root, transform=train_transform, **common)
        test_ds = InatDataset(test_name, root=root, transform=eval_transform, **common)
    else:
        train_ds = CifarDataset(root, split="train", transform=train_transform, **common)
        test_ds = CifarDataset(root, split="test", transform=eval_transform, **common)
        train_name, test_name = f"{train_ds.root} (train)", f"{test_ds.root} (test)"
    if train_ds.classes != test_ds.classes:
        raise ValueError(f"the classes of {train_name} ({len(train_ds.classes)}) and {test_name} "
                         f"({len(test_ds.classes)}) differ")
    return train_ds, test_ds
