"""Which files are images: the extensions the server decodes, and the image files under a folder (hidden files
and folders skipped, symlinked folders followed). Standard library only, so that the load generator
(``locustfile.py``) lists a payload folder as training, ``predict`` and INT8's calibration list theirs."""
from __future__ import annotations

import os
from collections import Counter

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """Whether a directory entry named ``name`` is read as an image: an image extension, not hidden (a
    macOS ``._photo.jpg`` AppleDouble file is metadata, not a photo)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


OS_FILES = frozenset({"Thumbs.db", "desktop.ini"})  # what Windows leaves in a photo folder (hidden ones: skipped)


def other_kinds(names) -> Counter:
    """``{extension (or the name, without one): count}`` of the file names that are not read as images, hidden
    files and the system's own (Thumbs.db) left out: an iPhone's .heic photos, say, which a command that reads a
    folder names in a warning rather than passing over in silence."""
    return Counter(os.path.splitext(n)[1].lower() or n for n in names
                   if not n.startswith(".") and n not in OS_FILES and not is_image_name(n))


def skipped_line(kinds: Counter) -> str:
    """The warning naming ``kinds`` (:func:`other_kinds`), e.g. "2 .heic, 1 .jfif"."""
    listed = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(5))
    return (f"warning: files of types that are not read are left out ({listed}); images must be one of "
            f"{', '.join(IMAGE_EXTENSIONS)} (convert the others, e.g. HEIC to JPEG)")


def image_files(folder: str, *, option: str = "--images", skipped: Counter | None = None) -> list[str]:
    """The image files under ``folder`` (or ``folder`` itself, an image file), sorted: symlinked sub-folders
    followed (``Path.rglob`` does not before Python 3.13), each real folder once (a link loop ends), hidden files
    and folders skipped (as training skips them). ``option`` names what gave ``folder`` in the errors; ``skipped``
    (a Counter) gets the :func:`other_kinds` of the files passed over."""
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
        if skipped is not None:
            skipped.update(other_kinds(files))
    return sorted(paths)
