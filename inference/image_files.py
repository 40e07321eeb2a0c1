"""Which files are images: the extensions the server decodes, and the image files under a folder (hidden files
and folders skipped, symlinked folders followed). Standard library only, so that the load generator
(``locustfile.py``) lists a payload folder as training, ``predict`` and INT8's calibration list theirs."""
from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """Whether a directory entry named ``name`` is read as an image: an image extension, not hidden (a
    macOS ``._photo.jpg`` AppleDouble file is metadata, not a photo)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(folder: str, *, option: str = "--images") -> list[str]:
    """The image files under ``folder`` (or ``folder`` itself, an image file), sorted: symlinked sub-folders
    followed (``Path.rglob`` does not before Python 3.13), each real folder once (a link loop ends), hidden files
    and folders skipped (as training skips them). ``option`` names what gave ``folder`` in the errors."""
    if os.path.isfile(folder) and is_image_name(os.path.basename(folder)):  # one photo
        return [folder]
    if os.path.isfile(folder):
        raise ValueError(f"{option} {folder}: not an image file ({', '.join(IMAGE_EXTENSIONS)}) nor a folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{option} {folder}: no such folder or image file")
    paths, seen = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [d for d in folders if not d.startswith(".")]
        paths += [os.path.join(root, f) for f in files if is_image_name(f)]
    return sorted(paths)
