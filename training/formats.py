"""The data-set formats and :func:`build_datasets`: which format a data folder is, and its train/test sets.

* ``imagefolder`` (:mod:`training.image_folder`): ``DATA/train`` and ``DATA/test`` (or ``DATA/val``);
  with both ``DATA/test`` and ``DATA/val``, ``val/`` is the validation split;
* ``inat`` (:mod:`training.inat`): ``DATA/train.json`` and ``DATA/val.json`` (or ``DATA/test.json``);
* ``cifar`` (:mod:`training.cifar`): a folder of CIFAR-10/100 python pickles.

:data:`FORMATS` is the list the command line offers (``--format``, with ``auto``: :func:`detect_format`).
:func:`build_datasets` returns the train and test sets (``evaluate`` and ``stats`` read them);
:func:`build_splits` the three splits training reads: train, validation (``DATA/val`` next to
``DATA/test``, else a stratified, seeded fraction of the training images) and test.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from inference.image_files import is_image_name

from .cifar import CIFAR_SUBFOLDERS, CifarDataset, is_cifar_folder
from .datasets import ImageSubset, stratified_split
from .image_folder import ImageFolderDataset, is_class_folder
from .inat import InatDataset

FORMATS = ("imagefolder", "inat", "cifar")
AUTO = "auto"
FORMAT_CHOICES = (AUTO, *FORMATS)  # what build_datasets(format=...) accepts


def detect_format(data: str | os.PathLike) -> str:
    """``"inat"`` (``train.json``), ``"cifar"`` (CIFAR pickles) or ``"imagefolder"`` (a ``train/`` folder of class
    folders; a ``train/`` of images is a class of that name, as in a test split of classes "train" and "bus")."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    if (root / "train.json").is_file():
        return "inat"
    if is_cifar_folder(root):
        return "cifar"
    if (root / "train").is_dir() and not any(is_image_name(f) for f in os.listdir(root / "train")):
        return "imagefolder"  # train/ of class folders (train/ of images: a class named "train", a class folder)
    if any(is_class_folder(p) and any(is_image_name(f) for f in os.listdir(p)) for p in root.iterdir()):
        raise ValueError(f"{data} holds class folders of images but no train/ and test/ splits: make them first "
                         f"with `python -m training split --images {data} --out {str(data).rstrip('/')}_split`, "
                         "then train on that")
    raise ValueError(f"cannot tell the format of {data}: looked for train.json (iNaturalist), CIFAR pickles "
                     f"(data_batch_1/test_batch or train/test files, also under {' or '.join(CIFAR_SUBFOLDERS)}) "
                     "and a train/ sub-folder (ImageFolder)")


def _first(root: Path, names: tuple[str, ...], is_ok, what: str) -> Path:
    for name in names:
        if is_ok(root / name):
            return root / name
    raise FileNotFoundError(f"{root} has none of the {what} {', '.join(names)}")


def _open_sets(data: str | os.PathLike, format: str, *, train: dict, test: dict) -> tuple[Dataset, Dataset, str, str]:
    """``(train_ds, test_ds, train_name, test_name)`` of a data folder in ``format`` (or :data:`AUTO`): the one
    place that maps a format to its files and dataset class; ``train`` and ``test`` are each set's keyword
    arguments (``max_bad_images`` is dropped for CIFAR, whose pickles hold no unreadable file)."""
    root = Path(data)
    if format == AUTO:
        format = detect_format(root)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected {AUTO} or one of {', '.join(FORMATS)}")
    if format == "imagefolder":
        train_dir = _first(root, ("train",), Path.is_dir, "sub-folders")
        test_dir = _first(root, ("test", "val"), Path.is_dir, "sub-folders")
        return ImageFolderDataset(train_dir, **train), ImageFolderDataset(test_dir, **test), str(train_dir), str(test_dir)
    if format == "inat":
        train_json = _first(root, ("train.json",), Path.is_file, "files")
        test_json = _first(root, ("val.json", "test.json"), Path.is_file, "files")
        return (InatDataset(train_json, root=root, **train), InatDataset(test_json, root=root, **test),
                str(train_json), str(test_json))
    train_ds = CifarDataset(root, split="train", **{k: v for k, v in train.items() if k != "max_bad_images"})
    test_ds = CifarDataset(root, split="test", **{k: v for k, v in test.items() if k != "max_bad_images"})
    return train_ds, test_ds, f"{train_ds.root} (train)", f"{test_ds.root} (test)"


def build_datasets(data: str | os.PathLike, *, format: str = AUTO, train_transform=None, eval_transform=None,
                   cache_transform=None, progress: bool = True) -> tuple[Dataset, Dataset]:
    """``(train_ds, test_ds)`` of a data folder.

    * ``imagefolder``: ``data/train`` and ``data/test`` (or ``data/val``);
    * ``inat``: ``data/train.json`` and ``data/val.json`` (or ``data/test.json``), images relative to ``data``;
    * ``cifar``: a folder of CIFAR-10/100 pickles (see :class:`CifarDataset`).

    ``train_transform`` and ``eval_transform`` run on every access of the train and test set;
    ``cache_transform`` (both sets) as in :class:`ImageFolderDataset`. Both sets must have the same classes.
    """
    common = dict(cache_transform=cache_transform, progress=progress)
    train_ds, test_ds, train_name, test_name = _open_sets(data, format, train=dict(transform=train_transform, **common),
                                                          test=dict(transform=eval_transform, **common))
    check_same_classes(train_name, train_ds.classes, test_name, test_ds.classes)
    return train_ds, test_ds


def check_same_classes(name: str, classes: list[str], other_name: str, other: list[str]) -> None:
    """A ``ValueError`` naming the classes that only one of two splits has (or, with the same ones, the order)."""
    if classes == other:
        return
    only = [f"only in {n}: {', '.join(map(repr, sorted(set(a) - set(b))[:5]))}"
            for n, a, b in ((name, classes, other), (other_name, other, classes)) if set(a) - set(b)]
    raise ValueError(f"the classes of {name} ({len(classes)}) and {other_name} ({len(other)}) differ"
                     f" ({'; '.join(only) or 'same names, other order'}): every split needs the same class folders")


@dataclass
class Splits:
    """The splits of one training run (:func:`build_splits`).

    ``train`` has the training transform; ``val`` (``None``: no validation split) and ``test`` give
    evaluation-transformed images. ``val_carved``: ``val`` was held out of the training images.
    ``bad_images``: the ``(path, reason)`` of unreadable training files skipped while caching;
    ``val_bad_images`` those of a ``val/`` folder.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    train_name: str
    val_name: str | None
    test_name: str
    val_carved: bool = False
    bad_images: list = field(default_factory=list)
    val_bad_images: list = field(default_factory=list)


def build_splits(data: str | os.PathLike, *, format: str = AUTO, train_transform=None, eval_transform=None,
                 cache: bool = True, val_fraction: float = 0.1, seed: int = 0, max_bad_images: int | None = None,
                 progress: bool = True) -> Splits:
    """Train, validation and test splits of a data folder, for training.

    * The **test** split is what :func:`build_datasets` calls it (``DATA/test`` or ``DATA/val``;
      ``val.json``/``test.json``; CIFAR's test batch). It is never cached: nothing of it is decoded
      until it is evaluated, and training evaluates it once, at the end.
    * The **validation** split, which chooses ``best.pt``: ``DATA/val`` when an ImageFolder root has
      both ``test/`` and ``val/``; otherwise ``val_fraction`` of the training images, stratified by
      class and seeded by ``seed`` (:func:`~training.datasets.stratified_split`); none when
      ``val_fraction`` is 0.
    * **train**: the remaining training images.

    ``eval_transform`` is the deterministic evaluation transform. With ``cache`` the training (and
    validation) images are decoded once through it into memory and ``train_transform`` runs on every
    access; without, every access decodes the file. ``max_bad_images``: how many unreadable training
    files caching may skip (``None``: an error naming the first).
    """
    cached = dict(cache_transform=eval_transform if cache else None, progress=progress)
    base, test_ds, train_name, test_name = _open_sets(
        data, format, train=dict(transform=train_transform, max_bad_images=max_bad_images, **cached),
        test=dict(transform=eval_transform, progress=progress))
    val_ds = val_name = None
    root = Path(data)
    if isinstance(base, ImageFolderDataset) and Path(test_name).name == "test" and (root / "val").is_dir():
        val_ds = ImageFolderDataset(root / "val", transform=None if cache else eval_transform,
                                    max_bad_images=max_bad_images, **cached)  # skipped as --no-cache does
        val_name = str(root / "val")
    for name, ds in ((test_name, test_ds), (val_name, val_ds)):
        if ds is not None:
            check_same_classes(train_name, base.classes, name, ds.classes)
    held_by = torch.bincount(torch.as_tensor(base.labels, dtype=torch.long), minlength=len(base.classes)).tolist()
    if empty := [c for c, n in zip(base.classes, held_by) if n == 0]:  # a model would learn a class never seen
        raise ValueError(f"{train_name}: no training image of class {', '.join(map(repr, empty))}: add images, or "
                         "remove the empty class folder (and its folders in the other splits)")
    train_ds, carved = base, False
    if val_ds is None and val_fraction > 0:
        keep, held = stratified_split(base.labels, val_fraction, seed=seed)
        if not held:
            raise ValueError(f"--val-fraction {val_fraction} holds out no image of {train_name} "
                             f"({len(base)} images): raise it, add a val/ folder, or pass --val-fraction 0")
        evaluated = copy.copy(base)  # shares paths, labels and the cache; decodes as the evaluation does
        evaluated.transform = None if cache else eval_transform
        train_ds, val_ds, carved = ImageSubset(base, keep), ImageSubset(evaluated, held), True
        val_name = f"{len(held)} images held out of {train_name} (--val-fraction {val_fraction}, stratified, seed {seed})"
    return Splits(train=train_ds, val=val_ds, test=test_ds, train_name=train_name, val_name=val_name,
                  test_name=test_name, val_carved=carved, bad_images=list(getattr(base, "bad_images", [])),
                  val_bad_images=[] if carved else list(getattr(val_ds, "bad_images", [])))
