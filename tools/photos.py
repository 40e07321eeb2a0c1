"""The payloads of the load runs and GPU benchmarks: real photos, re-encoded as 500x375 JPEG q90.

The photos, in this order: foolbox's 20 ImageNet JPEGs (foolbox is installed as data only, with
``--no-deps``: its own imports need packages this project does not install) -- or, where foolbox is
missing, the sample photos of scikit-image and scikit-learn, where those are installed -- then
matplotlib's ``grace_hopper.jpg`` (matplotlib is a dependency). With foolbox: 21 photos.

``photo_jpegs()`` gives ``(file name, JPEG bytes)`` in memory; ``write_photos(out)`` writes them as
``out/jpeg500/photos/*.jpg`` (and the original files under ``out/original/photos/``) for
``locustfile.py --images`` and for calibration, and returns ``out/jpeg500``.
"""
from __future__ import annotations

import importlib.util
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

SIZE = (500, 375)
QUALITY = 90
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "horse", "camera",
                  "hubble_deep_field")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@dataclass(frozen=True)
class Photo:
    name: str                          # file stem
    load: Callable[[], Image.Image]
    path: Path | None = None           # the original file, where the photo is one


def _file(path: Path) -> Photo:
    def load() -> Image.Image:
        with Image.open(path) as im:
            im.load()
            return im
    return Photo(path.stem, load, path)


def _foolbox() -> list[Photo]:
    spec = importlib.util.find_spec("foolbox")  # data only: importing foolbox would fail
    if not (spec and spec.submodule_search_locations):
        return []
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [_file(p) for p in sorted(data.glob("imagenet_*.jpg")) if p.is_file()]


def _skimage() -> list[Photo]:
    try:
        from skimage import data
    except ImportError:
        return []
    photos = []
    for name in SKIMAGE_PHOTOS:
        if hasattr(data, name):
            photos.append(Photo(name, lambda name=name: Image.fromarray(getattr(data, name)())))
    return photos


def _sklearn() -> list[Photo]:
    spec = importlib.util.find_spec("sklearn")
    if not (spec and spec.submodule_search_locations):
        return []
    base = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images"
    return [_file(base / f) for f in SKLEARN_PHOTOS if (base / f).is_file()]


def sources() -> list[Photo]:
    import matplotlib

    photos = _foolbox() or (_skimage() + _sklearn())
    grace = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if grace.is_file():
        photos.append(_file(grace))
    if not photos:
        raise SystemExit("no photos found: install foolbox==3.3.4 with --no-deps (make setup does)")
    return photos


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").resize(SIZE).save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def _encoded(photos: list[Photo]) -> Iterator[tuple[Photo, bytes]]:
    for photo in photos:
        try:
            data = encode(photo.load())
        except Exception:  # a scikit-image sample that cannot be read (some are downloaded on demand)
            if photo.path is not None:
                raise
            continue
        yield photo, data


def photo_jpegs() -> list[tuple[str, bytes]]:
    """Every photo as ``(NAME.jpg, 500x375 JPEG q90 bytes)``."""
    return [(f"{photo.name}.jpg", data) for photo, data in _encoded(sources())]


def write_photos(out: Path) -> Path:
    """The photos as ``out/jpeg500/photos/NAME.jpg`` (originals copied to ``out/original/photos/``);
    returns ``out/jpeg500``."""
    jpeg_dir, orig_dir = out / "jpeg500" / "photos", out / "original" / "photos"
    for d in (jpeg_dir, orig_dir):
        d.mkdir(parents=True, exist_ok=True)
    for photo, data in _encoded(sources()):
        if photo.path is not None:
            shutil.copy(photo.path, orig_dir / photo.path.name)
        (jpeg_dir / f"{photo.name}.jpg").write_bytes(data)
    return out / "jpeg500"
