"""The ImageFolder format (training.image_folder)."""
import pytest
import torch

from inference.transforms import EvalPreset
from training.image_folder import ImageFolderDataset, scan_image_folder


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


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """A tree copied from a Mac or opened in Jupyter: `.ipynb_checkpoints` became a class and `._a.png`
    AppleDouble files became unreadable "images"."""
    from tests.conftest import encode, pattern_image
    for c in ("cat", "dog", ".ipynb_checkpoints"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "a.png").write_bytes(encode(pattern_image("circle", size=8)))
    (tmp_path / "cat" / "._a.png").write_bytes(b"\0\5\x16\7AppleDouble")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"Bud1")
    classes, paths, labels = scan_image_folder(tmp_path)
    assert classes == ["cat", "dog"] and [p.split("/")[-2:] for p in paths] == [["cat", "a.png"], ["dog", "a.png"]]


def test_splits_with_other_classes_name_them(tmp_path):
    from tests.conftest import encode, pattern_image
    from training.formats import build_splits
    for split, classes in (("train", ("cat", "dog", "fox")), ("test", ("cat", "dgo"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "a.png").write_bytes(encode(pattern_image("circle", size=8)))
    with pytest.raises(ValueError, match=r"\(3\) and .*test \(2\) differ \(only in .*train: 'dog', 'fox'; only in "
                                         r".*test: 'dgo'\)"):
        build_splits(tmp_path, cache=False, progress=False)


def test_training_photos_decode_reduced_as_far_as_the_random_crop_allows(tmp_path):
    """--preset photo on phone photos: the training view decodes a 4032x3024 JPEG at 1/2 (TrainPreset's
    min_decode_side, 915), the validation view carved from it at 1/8 as the server does (EvalPreset: 256)."""
    import numpy as np
    from PIL import Image

    from training.presets import TrainPreset
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((3024, 4032, 3), 90 if c == "a" else 160, np.uint8)).save(tmp_path / c / "p.jpg",
                                                                                          quality=90)
    train = ImageFolderDataset(tmp_path, transform=TrainPreset(crop_size=224, mode="random_resized_crop"))
    assert train.read(0).shape == (3, 1512, 2016) and train[0][0].shape == (3, 224, 224)
    evaluated = ImageFolderDataset(tmp_path, transform=EvalPreset(crop_size=224, resize_size=256))
    assert evaluated.read(1).shape == (3, 378, 504)


@pytest.mark.parametrize("text", ['["cat", "dog"]', '{"cat": 1}', "{cat: Katze}"])
def test_a_class_names_file_of_another_shape_is_one_line(tmp_path, text):
    from tests.conftest import encode, pattern_image
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "a.png").write_bytes(encode(pattern_image("circle", size=8)))
    (tmp_path / "class_names.json").write_text(text)
    with pytest.raises(ValueError, match=r"class_names.json: (expected \{\"folder name\"|not valid JSON)"):
        scan_image_folder(tmp_path)
    (tmp_path / "class_names.json").write_text('{"cat": "Katze"}')
    assert scan_image_folder(tmp_path)[0] == ["Katze", "dog"]
