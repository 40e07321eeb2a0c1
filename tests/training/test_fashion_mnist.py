"""Fashion-MNIST preparation (training.fashion_mnist)."""
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

from training.fashion_mnist import FASHION_MNIST_CLASSES, prepare_fashion_mnist
from training.image_folder import ImageFolderDataset, scan_image_folder


def _write_idx(folder, prefix, images, labels):
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def test_prepare_fashion_mnist_writes_an_image_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    _write_idx(src, "train", train, np.arange(20, dtype=np.uint8) % 10)
    _write_idx(src, "t10k", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8))
    out = prepare_fashion_mnist(tmp_path / "fm", source=str(src), progress=False)
    classes, paths, labels = scan_image_folder(out / "train")
    assert sorted(classes) == sorted(FASHION_MNIST_CLASSES)  # real names, "T-shirt/top" included
    assert len(paths) == 20 and os.path.isdir(out / "train" / "T-shirt_top")
    assert json.loads((out / "class_names.json").read_text())["T-shirt_top"] == "T-shirt/top"
    ds = ImageFolderDataset(out / "train", progress=False)
    img, label = ds[paths.index(str(out / "train" / "Trouser" / "00001.png"))]
    assert ds.classes[label] == "Trouser"
    assert img.shape == (3, 28, 28) and torch.equal(img[0], torch.from_numpy(train[1]))  # gray -> 3 channels
    mtime = os.path.getmtime(out / "train" / "Trouser" / "00001.png")
    prepare_fashion_mnist(tmp_path / "fm", source=str(src), progress=False)  # idempotent: nothing rewritten
    assert os.path.getmtime(out / "train" / "Trouser" / "00001.png") == mtime


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_the_installed_fashion_mnist_has_60000_and_10000_images():
    from training.fashion_mnist import _read_idx
    src = "/usr/share/datasets/fashion-mnist"
    assert _read_idx(f"{src}/train-images-idx3-ubyte.gz", 16).size == 60000 * 28 * 28
    assert _read_idx(f"{src}/t10k-labels-idx1-ubyte.gz", 8).size == 10000


def test_prepare_without_the_package_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "x", source=str(tmp_path / "missing"))
