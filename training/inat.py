"""The iNaturalist-2021-style JSON format: ``images``/``annotations``/``categories``.

Class order is the categories sorted by id; image paths are relative to an image root (default: the
JSON file's folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .datasets import LabelledImages


def _require(mapping, key: str, where: str):
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{where}: missing key {key!r}")
    return mapping[key]


def read_inat_json(json_path: str | os.PathLike, *, root: str | os.PathLike | None = None
                   ) -> tuple[list[str], list[str], list[int]]:
    """Return ``(class_names, paths, labels)`` of an iNaturalist-2021-style JSON file.

    ``images`` (``id``, ``file_name`` relative to ``root``, default: the JSON file's folder),
    ``annotations`` (``image_id``, ``category_id``), ``categories`` (``id``, ``name``). Classes are
    the categories sorted by id (all of them, also those without images, so train and val files
    with the same categories share label numbers); images keep the file's order.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"iNaturalist JSON file not found: {json_path}")
    root = Path(root) if root is not None else json_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root of {json_path} not found: {root}")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    name = str(json_path)
    images = _require(meta, "images", name)
    annotations = _require(meta, "annotations", name)
    categories = _require(meta, "categories", name)
    if not categories:
        raise ValueError(f"{name}: 'categories' is empty")
    cats = sorted((_require(c, "id", f"{name} categories[{i}]"), str(_require(c, "name", f"{name} categories[{i}]")))
                  for i, c in enumerate(categories))
    label_of = {}
    for label, (cid, _) in enumerate(cats):
        if cid in label_of:
            raise ValueError(f"{name}: category id {cid!r} appears twice in 'categories'")
        label_of[cid] = label
    file_of = {}
    for i, img in enumerate(images):
        iid = _require(img, "id", f"{name} images[{i}]")
        if iid in file_of:
            raise ValueError(f"{name}: image id {iid!r} appears twice in 'images'")
        file_of[iid] = _require(img, "file_name", f"{name} images[{i}]")
    category_of = {}
    for i, ann in enumerate(annotations):
        where = f"{name} annotations[{i}]"
        iid, cid = _require(ann, "image_id", where), _require(ann, "category_id", where)
        if cid not in label_of:
            raise ValueError(f"{where}: category_id {cid!r} is not in 'categories'")
        if iid not in file_of:
            raise ValueError(f"{where}: image_id {iid!r} is not in 'images'")
        if category_of.setdefault(iid, cid) != cid:
            raise ValueError(f"{where}: image {iid!r} is annotated with two categories "
                             f"({category_of[iid]!r} and {cid!r})")
    unlabelled = [iid for iid in file_of if iid not in category_of]
    if unlabelled:
        raise ValueError(f"{name}: {len(unlabelled)} image(s) have no annotation, e.g. image id {unlabelled[0]!r}")
    if not file_of:
        raise ValueError(f"{name}: 'images' is empty")
    paths = [str(root / f) for f in file_of.values()]
    if not os.path.isfile(paths[0]):  # cheap check that root is right; every file is checked when read
        raise FileNotFoundError(f"{name}: image file {paths[0]} not found (file_name is relative to the image "
                                f"root {root}; pass root= if the images lie elsewhere)")
    labels = [label_of[category_of[iid]] for iid in file_of]
    return [n for _, n in cats], paths, labels


class InatDataset(LabelledImages):
    """An iNaturalist-2021-style JSON file (see :func:`read_inat_json`) as uint8 tensors.

    ``transform``/``cache_transform``/``progress``/``max_bad_images`` as in
    :class:`~training.image_folder.ImageFolderDataset`.
    """

    def __init__(self, json_path: str | os.PathLike, *, root: str | os.PathLike | None = None, transform=None,
                 cache_transform=None, progress: bool = True, max_bad_images: int | None = None):
        self.json_path = str(json_path)
        self.root = str(root if root is not None else Path(json_path).parent)
        self.classes, self.paths, labels = read_inat_json(json_path, root=root)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.transform = transform
        self.cache = None
        if cache_transform is not None:
            self._build_cache(cache_transform, progress=progress, desc=f"decode {json_path}",
                              max_bad_images=max_bad_images)
