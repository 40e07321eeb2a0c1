"""Data shared by the format tests: an iNaturalist-2021-style folder."""
import json

import pytest

from tests.conftest import encode, pattern_image

INAT_CATEGORIES = [{"id": 7, "name": "zebra"}, {"id": 2, "name": "ant"}, {"id": 5, "name": "moose"}]


def write_inat(root, split, n_per_class=2, seed=0):
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
    write_inat(tmp_path, "train", 3)
    write_inat(tmp_path, "val", 2, seed=5)
    return tmp_path


SHAPES = ("circle", "horizontal", "vertical")


def write_shapes(root, splits: dict, size: int = 20, classes=SHAPES):
    """``root/<split>/<class>/<i>.png`` pattern images, ``splits`` = {split name: images per class}."""
    for s, (split, n) in enumerate(splits.items()):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i:03d}.png").write_bytes(encode(pattern_image(c, size=size, seed=1000 * s + 7 * i + len(c))))
    return root


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory):
    """A few seconds' worth of training: 3 classes x 12 train and x 4 test images of 20 px."""
    return write_shapes(tmp_path_factory.mktemp("small"), {"train": 12, "test": 4})
