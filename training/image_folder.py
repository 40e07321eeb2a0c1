"""The ImageFolder format: ``DIR/<class>/<image>`` trees.

Class order is the sorted folder names (torchvision's ImageFolder convention). A folder name cannot
hold ``/``; an optional ``DIR/class_names.json`` (``{"folder": "display name"}``, also looked up in
the parent folder) gives the names shown to people, e.g. ``"T-shirt_top" -> "T-shirt/top"``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from inference.image_files import IMAGE_EXTENSIONS, is_image_name

from .datasets import LabelledImages

CLASS_NAMES_FILE = "class_names.json"


def is_class_folder(path: Path) -> bool:
    """A class folder: any folder not hidden (``.ipynb_checkpoints``, ``.git`` and the like are not classes)."""
    return path.is_dir() and not path.name.startswith(".")


def folder_name(class_name: str) -> str:
    """The folder of a class name: ``/`` cannot be in a folder name and becomes ``_``."""
    return class_name.replace("/", "_")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Return ``(class_names, paths, labels)`` for an ImageFolder tree (hidden entries skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if is_class_folder(p))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class name>/<images>")
    display = {}
    for names_file in (root / CLASS_NAMES_FILE, root.parent / CLASS_NAMES_FILE):
        if names_file.is_file():
            display = _display_names(names_file)
            break
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in os.listdir(root / folder) if is_image_name(f))
        paths += [str(root / folder / f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [display.get(f, f) for f in folders], paths, labels


def _display_names(path: Path) -> dict[str, str]:
    """``class_names.json``: ``{"folder": "display name", ...}``; anything else is one ``ValueError`` naming it."""
    try:
        display = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(display, dict) or not all(isinstance(v, str) for v in display.values()):
        raise ValueError(f'{path}: expected {{"folder name": "display name", ...}}, got {type(display).__name__} '
                         f"{json.dumps(display)[:60]}")
    return display


class ImageFolderDataset(LabelledImages):
    """An ImageFolder tree as uint8 tensors: ``(transform(image), label)``.

    With ``cache_transform`` every image is decoded once, passed through ``cache_transform`` (the
    deterministic part, e.g. :class:`~inference.transforms.EvalPreset`) and kept in memory; ``transform``
    then runs on the cached tensor each time (the random part). Without it images are decoded on
    every access, for data sets that do not fit in memory.

    ``max_bad_images``: ``None`` (an unreadable file while caching is an error naming it) or how many
    unreadable files caching may skip (listed in ``bad_images``; see ``LabelledImages._build_cache``).
    """

    def __init__(self, root: str | os.PathLike, *, transform=None, cache_transform=None, progress: bool = True,
                 max_bad_images: int | None = None):
        self.root = str(root)
        self.classes, self.paths, labels = scan_image_folder(root)
        self.labels = torch.tensor(labels)
        self.transform = transform
        self.cache = None
        if cache_transform is not None:
            self._build_cache(cache_transform, progress=progress, desc=f"decode {root}", max_bad_images=max_bad_images)

