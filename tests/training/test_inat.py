"""The iNaturalist-style JSON format (training.inat); the data come from tests/training/conftest.py."""
import json

import pytest
import torch

from inference.transforms import EvalPreset
from tests.training.conftest import write_inat
from training.inat import InatDataset


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
    meta = write_inat(tmp_path, "train", 1)
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
