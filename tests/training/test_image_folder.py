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
