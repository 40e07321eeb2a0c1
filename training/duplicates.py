"""Identical image files among the classes of a labelled folder: groups of files with the same bytes.

``python -m training split`` keeps each group in one split (a photo imported twice, "IMG_0003.JPG" and
"IMG_0003 (1).JPG", would otherwise be trained on and then tested on, inflating the test score) and names the
photos filed under more than one class (one photo, two labels: the model cannot learn both). Each file is read
once and hashed (SHA-256).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def find_duplicates(images: str | os.PathLike, classes: dict[str, list[str]]
                    ) -> tuple[dict[str, list[list[str]]], list[list[tuple[str, str]]]]:
    """``(groups, across)`` of ``images/<class>/<name>`` for ``classes`` (``{class: file names}``): ``groups``
    is ``{class: [[names with the same bytes], ...]}``, every file in exactly one group (most of one file), each
    group's names sorted and the groups in the order of their first name; ``across`` lists the sets of
    ``(class, name)`` with the same bytes in more than one class."""
    by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for cls, names in sorted(classes.items()):
        for name in names:
            by_digest[file_digest(Path(images) / cls / name)].append((cls, name))
    groups: dict[str, list[list[str]]] = {cls: [] for cls in classes}
    across = []
    for members in by_digest.values():
        per_class: dict[str, list[str]] = defaultdict(list)
        for cls, name in members:
            per_class[cls].append(name)
        for cls, names in per_class.items():
            groups[cls].append(sorted(names))
        if len(per_class) > 1:
            across.append(sorted(members))
    return {cls: sorted(g) for cls, g in groups.items()}, sorted(across)
