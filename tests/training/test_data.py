import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

from training.data import FASHION_MNIST_CLASSES, ImageFolderDataset, prepare_fashion_mnist, scan_image_folder
from training.presets import EvalPreset


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
    from training.data import _read_idx
    src = "/usr/share/datasets/fashion-mnist"
    assert _read_idx(f"{src}/train-images-idx3-ubyte.gz", 16).size == 60000 * 28 * 28
    assert _read_idx(f"{src}/t10k-labels-idx1-ubyte.gz", 8).size == 10000


def test_prepare_without_the_package_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "x", source=str(tmp_path / "missing"))


def test_image_folder_cache_equals_decoding_each_time(image_folder):
    preset = EvalPreset(crop_size=16)
    cached = ImageFolderDataset(image_folder / "test", cache_transform=preset, progress=False)
    lazy = ImageFolderDataset(image_folder / "test", transform=preset)
    assert cached.classes == lazy.classes == ["circle", "horizontal", "vertical"]
    assert len(cached) == 90
    for i in (0, 31, 89):
        assert torch.equal(cached[i][0], lazy[i][0]) and cached[i][1] == lazy[i][1]


def test_folder_without_classes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        scan_image_folder(tmp_path / "nope")


# --------------------------------------------------------------------------- iNaturalist, CIFAR, formats, stats

import pickle  # noqa: E402

from tests.conftest import encode, pattern_image  # noqa: E402
from training.data import (CifarDataset, InatDataset, build_datasets, class_balanced_sampler,  # noqa: E402
                           dataset_stats, detect_format, load_cifar_pickle, parse_normalize)

INAT_CATEGORIES = [{"id": 7, "name": "zebra"}, {"id": 2, "name": "ant"}, {"id": 5, "name": "moose"}]


def _write_inat(root, split, n_per_class=2, seed=0):
    """``root/split.json`` + ``root/split/<cat id>/<i>.png`` in the iNaturalist 2021 layout."""
    images, annotations, image_id = [], [], seed * 1000
    for k, cat in enumerate(INAT_CATEGORIES):
        folder = root / split / str(cat["id"])
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            file_name = f"{split}/{cat['id']}/{i}.png"
            (root / file_name).write_bytes(encode(pattern_image(("circle", "horizontal", "vertical")[k], size=12,
                                                                seed=seed + 10 * k + i)))
            images.append({"id": image_id, "file_name": file_name, "width": 12, "height": 12})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": cat["id"]})
            image_id += 1
    meta = {"info": {}, "images": images, "annotations": annotations, "categories": INAT_CATEGORIES}
    (root / f"{split}.json").write_text(json.dumps(meta))
    return meta


@pytest.fixture()
def inat_folder(tmp_path):
    _write_inat(tmp_path, "train", 3)
    _write_inat(tmp_path, "val", 2, seed=5)
    return tmp_path


def test_inat_classes_are_categories_sorted_by_id(inat_folder):
    ds = InatDataset(inat_folder / "train.json", progress=False)
    assert ds.classes == ["ant", "moose", "zebra"]  # ids 2, 5, 7
    assert len(ds) == 9 and ds.labels.dtype == torch.long
    # the file lists zebra (7) first, then ant (2), then moose (5)
    assert ds.labels.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert ds.paths[0] == str(inat_folder / "train" / "7" / "0.png")
    img, label = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 12, 12) and label == 0
    cached = InatDataset(inat_folder / "val.json", cache_transform=EvalPreset(crop_size=8), progress=False)
    lazy = InatDataset(inat_folder / "val.json", root=inat_folder, transform=EvalPreset(crop_size=8))
    assert cached.cache.shape == (6, 3, 8, 8)
    for i in range(6):
        assert torch.equal(cached[i][0], lazy[i][0]) and cached[i][1] == lazy[i][1]


def test_inat_errors_are_clear(tmp_path):
    meta = _write_inat(tmp_path, "train", 1)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        InatDataset(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in meta.items() if k != "annotations"}))
    with pytest.raises(ValueError, match="missing key 'annotations'"):
        InatDataset(bad)
    bad.write_text(json.dumps({**meta, "annotations": [{"image_id": meta["images"][0]["id"], "category_id": 99}]}))
    with pytest.raises(ValueError, match="category_id 99 is not in 'categories'"):
        InatDataset(bad)
    bad.write_text(json.dumps({**meta, "images": [*meta["images"], {"id": 1234}]}))
    with pytest.raises(ValueError, match=r"images\[3\]: missing key 'file_name'"):
        InatDataset(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        InatDataset(tmp_path / "train.json", root=tmp_path / "train")  # wrong image root


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


def test_detect_format_and_build_datasets(image_folder, inat_folder, tmp_path):
    assert detect_format(image_folder) == "imagefolder"
    assert detect_format(inat_folder) == "inat"
    preset = EvalPreset(crop_size=8)
    train, test = build_datasets(image_folder, train_transform=preset, eval_transform=preset)
    assert isinstance(train, ImageFolderDataset) and train.classes == test.classes and len(test) == 90
    assert train[0][0].shape == (3, 8, 8)
    train, test = build_datasets(inat_folder, format="inat", cache_transform=preset, progress=False)
    assert isinstance(test, InatDataset) and (len(train), len(test)) == (9, 6) and test.cache.shape == (6, 3, 8, 8)
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="train.json.*CIFAR.*train/"):
        detect_format(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_format(tmp_path / "missing")
    (tmp_path / "x" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="test, val"):
        build_datasets(tmp_path / "x")
    os.rename(inat_folder / "val.json", inat_folder / "other.json")
    with pytest.raises(FileNotFoundError, match="val.json, test.json"):
        build_datasets(inat_folder)
    with pytest.raises(ValueError, match="unknown data format"):
        build_datasets(inat_folder, format="coco")


def test_imagefolder_val_split_and_class_mismatch(tmp_path):
    for split, classes in (("train", ["a", "b"]), ("val", ["a", "c"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "0.png").write_bytes(encode(pattern_image("circle", size=8)))
    with pytest.raises(ValueError, match="classes of .*train.*val.* differ"):
        build_datasets(tmp_path)


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


def test_class_balanced_sampler_draws_classes_equally():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2])
    sampler = class_balanced_sampler(labels, num_samples=6000, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler) and len(sampler) == 6000
    assert torch.allclose(sampler.weights[[0, 90, 99]], torch.tensor([1 / 90, 1 / 9, 1.0], dtype=torch.float64))
    freq = torch.bincount(labels[list(sampler)], minlength=3) / 6000
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)
    assert len(class_balanced_sampler([1, 1, 0])) == 3
