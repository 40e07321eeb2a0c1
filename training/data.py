"""Data: ImageFolder trees (``DIR/<class>/<image>``) and the embedded Fashion-MNIST set.

Class order is the sorted folder names (torchvision's ImageFolder convention). A folder name cannot
hold ``/``; an optional ``DIR/class_names.json`` (``{"folder": "display name"}``) gives the names
shown to people, e.g. ``"T-shirt_top" -> "T-shirt/top"``.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .images import read_image_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_NAMES_FILE = "class_names.json"

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def folder_name(class_name: str) -> str:
    return class_name.replace("/", "_")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Return ``(class_names, paths, labels)`` for an ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class name>/<images>")
    display = {}
    if (root / CLASS_NAMES_FILE).is_file():
        display = json.loads((root / CLASS_NAMES_FILE).read_text(encoding="utf-8"))
    elif (root.parent / CLASS_NAMES_FILE).is_file():
        display = json.loads((root.parent / CLASS_NAMES_FILE).read_text(encoding="utf-8"))
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in os.listdir(root / folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [str(root / folder / f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [display.get(f, f) for f in folders], paths, labels


class ImageFolderDataset(Dataset):
    """An ImageFolder tree as uint8 tensors: ``(transform(image), label)``.

    With ``cache_transform`` every image is decoded once, passed through ``cache_transform`` (the
    deterministic part, e.g. :class:`~training.presets.EvalPreset`) and kept in memory; ``transform``
    then runs on the cached tensor each time (the random part). Without it images are decoded on
    every access, for data sets that do not fit in memory.
    """

    def __init__(self, root: str | os.PathLike, *, transform=None, cache_transform=None, progress: bool = True):
        self.root = str(root)
        self.classes, self.paths, labels = scan_image_folder(root)
        self.labels = torch.tensor(labels)
        self.transform = transform
        self.cache = None
        if cache_transform is not None:
            self.cache = torch.stack([cache_transform(read_image_file(p))
                                      for p in tqdm(self.paths, desc=f"decode {root}", disable=not progress,
                                                    mininterval=1.0)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.cache[i] if self.cache is not None else read_image_file(self.paths[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def prepare_fashion_mnist(out: str | os.PathLike, *, source: str = FASHION_MNIST_DIR, progress: bool = True) -> Path:
    """Write Fashion-MNIST as ``out/{train,test}/<class>/<index>.png`` plus ``out/class_names.json``.

    Idempotent: a split whose image count is already complete is skipped.
    """
    from PIL import Image

    out = Path(out)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} not found: install the Debian package dataset-fashion-mnist "
                                "(apt-get install -y dataset-fashion-mnist)")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(f"{source}/{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(f"{source}/{prefix}-labels-idx1-ubyte.gz", 8)
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} {split} images but {len(labels)} labels")
        split_dir = out / split
        done = split_dir.is_dir() and sum(len(files) for _, _, files in os.walk(split_dir)) == len(images)
        if done:
            continue
        for name in FASHION_MNIST_CLASSES:
            (split_dir / folder_name(name)).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(images)), desc=f"fashion-mnist {split}", disable=not progress, mininterval=1.0):
            path = split_dir / folder_name(FASHION_MNIST_CLASSES[labels[i]]) / f"{i:05d}.png"
            Image.fromarray(images[i], mode="L").save(path)
    (out / CLASS_NAMES_FILE).write_text(json.dumps({folder_name(n): n for n in FASHION_MNIST_CLASSES}, indent=1))
    return out
