"""CIFAR-10/100 python pickles and the restricted unpickler (training.cifar)."""
import os
import pickle

import numpy as np
import pytest
import torch

from inference.transforms import EvalPreset
from training.cifar import CifarDataset, load_cifar_pickle
from training.formats import build_datasets, detect_format

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar10(root, n=6):
    """Official CIFAR-10 layout; Python-2-style bytes keys, pickled with protocol 2 like the originals."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_NAMES], b"num_vis": 3072}, f, protocol=2)
    return batches


def _cifar100(root, n=5):
    """CIFAR-100 layout (train/test/meta, fine labels), str keys, pickle protocol 5 (numpy _frombuffer)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = [f"class{i:02d}" for i in range(100)]
    out = {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        out[split] = (data, fine)
        with open(root / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [0] * n}, f, protocol=5)
    with open(root / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, f, protocol=5)
    return names, out


def test_cifar10_pickles_load_as_uint8_images(tmp_path):
    batches = _cifar10(tmp_path / "cifar-10-batches-py")
    ds = CifarDataset(tmp_path, progress=False)  # the folder the archive was extracted into also works
    assert ds.classes == CIFAR10_NAMES and len(ds) == 12 and ds.cache.shape == (12, 3, 32, 32)
    assert ds.paths[7] == "data_batch_2#1" and ds.labels.dtype == torch.long
    data, labels = batches["data_batch_2"]
    img, label = ds[7]
    assert img.dtype == torch.uint8 and label == labels[1]
    assert torch.equal(img, torch.from_numpy(data[1]).view(3, 32, 32))  # rows are R plane, G plane, B plane
    test = CifarDataset(tmp_path / "cifar-10-batches-py", split="test", transform=EvalPreset(crop_size=24))
    assert len(test) == 6 and test[0][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="split"):
        CifarDataset(tmp_path, split="val")


def test_cifar_cache_transform_runs_once_per_image(tmp_path):
    _cifar10(tmp_path)
    calls = []

    def cache_transform(img):
        calls.append(1)
        return EvalPreset(crop_size=16)(img)

    ds = CifarDataset(tmp_path, cache_transform=cache_transform, transform=lambda x: x.flip(-1), progress=False)
    assert len(calls) == 12 and ds.cache.shape == (12, 3, 16, 16)
    assert torch.equal(ds[3][0], ds.cache[3].flip(-1)) and len(calls) == 12


def test_cifar100_uses_fine_labels(tmp_path):
    names, out = _cifar100(tmp_path)
    train, test = build_datasets(tmp_path, progress=False)
    assert detect_format(tmp_path) == "cifar" and isinstance(train, CifarDataset)
    assert train.classes == test.classes == names and len(train) == len(test) == 5
    assert train.labels.tolist() == out["train"][1] and test.paths[2] == "test#2"
    assert torch.equal(test[4][0], torch.from_numpy(out["test"][0][4]).view(3, 32, 32))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")  # would create a file while unpickling


def test_a_malicious_cifar_pickle_is_refused(tmp_path):
    _cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"], b"x": _Evil(str(marker))}, f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to unpickle (io|builtins)\.open"):
        CifarDataset(tmp_path, progress=False)
    assert not marker.exists()
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump([os.getcwd, 1], f)  # any global outside numpy's array reconstruction
    with pytest.raises(ValueError, match="refusing"):
        load_cifar_pickle(tmp_path / "evil")


def test_cifar_missing_files_are_named(tmp_path):
    _cifar10(tmp_path)
    os.remove(tmp_path / "batches.meta")
    with pytest.raises(FileNotFoundError, match="batches.meta"):
        CifarDataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="looked for data_batch_1"):
        CifarDataset(tmp_path / "empty")
    for f in ("data_batch_1", "data_batch_2"):
        os.remove(tmp_path / f)
    (tmp_path / "batches.meta").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing CIFAR file.*data_batch_1"):
        CifarDataset(tmp_path)
