"""Format detection and build_datasets (training.formats)."""
import os

import pytest

from inference.transforms import EvalPreset
from tests.conftest import encode, pattern_image
from training.formats import build_datasets, detect_format
from training.image_folder import ImageFolderDataset
from training.inat import InatDataset


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


def test_an_unsplit_photo_folder_and_an_empty_class_are_one_clear_line(small_folder, tmp_path):
    """`train --data photos` (class folders, not yet split) said "cannot tell the format"; a hand-made tree with
    an empty class folder trained a model with a class it never saw (the server could answer it)."""
    import shutil

    from training.formats import build_splits
    photos = tmp_path / "photos"
    shutil.copytree(small_folder / "train", photos)  # the class folders themselves
    with pytest.raises(ValueError, match=r"class folders of images but no train/ and test/ splits: make them first "
                                         r"with `python -m training split --images .*photos --out .*photos_split`"):
        detect_format(photos)
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    for split in ("train", "test"):
        (data / split / "fish").mkdir()
    with pytest.raises(ValueError, match=r"no training image of class 'fish': add images, or remove the empty"):
        build_splits(data, val_fraction=0.25, progress=False)


def test_a_class_named_train_is_a_class_not_a_data_set_root(tmp_path):
    """Vehicle classes "bus" and "train": evaluate --data data/mine/test read test/train/ as a data set's train
    split and failed ('has none of the sub-folders test, val'); export too."""
    from training.evaluation import eval_dataset
    for split in ("train", "test"):
        for c in ("bus", "train"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / c / f"{i}.png").write_bytes(encode(pattern_image("circle", seed=i)))
    assert detect_format(tmp_path) == "imagefolder"  # the data set's root: train/ holds class folders
    ds = eval_dataset(str(tmp_path / "test"))
    assert ds.classes == ["bus", "train"] and len(ds) == 4
