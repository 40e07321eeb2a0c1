"""Fashion-MNIST preparation: the Debian package's IDX files written as an ImageFolder tree."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

from .image_folder import CLASS_NAMES_FILE, folder_name
from .progress import tqdm

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


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
