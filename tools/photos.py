"""The payloads of the load runs and GPU benchmarks: real photos, re-encoded as JPEG q90 in three sets.

* ``jpeg500`` -- every photo at 500x375 (the size of a typical test image);
* ``phone12mp`` -- every photo as a phone camera writes it: cropped to 4:3, upscaled to 4032x3024
  (12.2 MP), with sensor-like noise so that the files have a phone's size (about 2-3 MB at q90 instead
  of the <1 MB of a smooth upscale), every third one stored sideways with an EXIF orientation tag, as
  phones held upright do;
* ``mixed`` -- the photos at sizes from 0.1 to 12 MP (``MIXED_SIZES``, in turn), so that one batch
  holds different sizes.

The photos, in this order: foolbox's 20 ImageNet JPEGs (foolbox is installed as data only, with
``--no-deps``: its own imports need packages this project does not install) -- or, where foolbox is
missing, the sample photos of scikit-image and scikit-learn, where those are installed -- then
matplotlib's ``grace_hopper.jpg`` (matplotlib is a dependency). With foolbox: 21 photos.

``photo_jpegs(set)`` gives ``(file name, JPEG bytes)`` in memory; ``write_photos(out, sets)`` writes them
as ``out/SET/photos/*.jpg`` (and the original files under ``out/original/photos/``) for ``locustfile.py
--images`` and for calibration, and returns ``out/jpeg500``; ``jpeg_files(folder)`` lists a folder's
JPEGs, or writes the ``jpeg500`` set to a temporary folder and lists those (the CLIs' ``--images``).
"""
from __future__ import annotations

import importlib.util
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

SIZE = (500, 375)
QUALITY = 90
PHONE_SIZE = (4032, 3024)         # a 12 MP phone camera, landscape
PHONE_NOISE = 5.0                 # std of the Gaussian sensor noise, in 8-bit levels
MIXED_SIZES = ((384, 256), (640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3264, 2448), PHONE_SIZE)
SETS = ("jpeg500", "phone12mp", "mixed")
EXIF_ORIENTATION = 0x0112
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


def encode(image: Image.Image, size: tuple[int, int] = SIZE) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").resize(size).save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def phone_photo(image: Image.Image, *, size: tuple[int, int] = PHONE_SIZE, noise: float = PHONE_NOISE,
                sideways: bool = False, seed: int = 0) -> bytes:
    """``image`` as a phone camera would store it: center-cropped to the aspect of ``size``, upscaled
    (bicubic), with Gaussian sensor noise, JPEG q90; ``sideways``: the pixels rotated a quarter turn
    and EXIF orientation 6 set (what a phone held upright writes), so decoders must apply it."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    aspect = size[0] / size[1]
    cw, ch = (min(w, round(h * aspect)), min(h, round(w / aspect)))
    left, top = (w - cw) // 2, (h - ch) // 2
    rgb = rgb.crop((left, top, left + cw, top + ch)).resize(size, Image.BICUBIC)
    if noise:
        rng = np.random.default_rng(seed)
        pixels = np.asarray(rgb, dtype=np.float32) + rng.normal(0.0, noise, (size[1], size[0], 3)).astype(np.float32)
        rgb = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    exif = Image.Exif()
    if sideways:  # stored rotated 90 degrees clockwise; orientation 6 tells viewers to turn it back
        rgb = rgb.transpose(Image.Transpose.ROTATE_270)
        exif[EXIF_ORIENTATION] = 6
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=QUALITY, exif=exif.tobytes())
    return buf.getvalue()


def _encode_as(image: Image.Image, set_name: str, index: int) -> bytes:
    if set_name == "jpeg500":
        return encode(image)
    if set_name == "phone12mp":
        return phone_photo(image, sideways=index % 3 == 2, seed=index)
    if set_name == "mixed":
        return phone_photo(image, size=MIXED_SIZES[index % len(MIXED_SIZES)], seed=index)
    raise ValueError(f"unknown payload set {set_name!r}; choose from {SETS}")


def _encoded(photos: list[Photo], set_name: str = "jpeg500") -> Iterator[tuple[Photo, bytes]]:
    index = 0
    for photo in photos:
        try:
            image = photo.load()
        except Exception:  # a scikit-image sample that cannot be read (some are downloaded on demand)
            if photo.path is not None:
                raise
            continue
        yield photo, _encode_as(image, set_name, index)
        index += 1


def photo_jpegs(set_name: str = "jpeg500", *, limit: int | None = None) -> list[tuple[str, bytes]]:
    """Every photo (the first ``limit``) as ``(NAME.jpg, JPEG bytes)`` of payload set ``set_name``."""
    return [(f"{photo.name}.jpg", data) for photo, data in _encoded(sources()[:limit], set_name)]


def write_photos(out: Path, sets: tuple[str, ...] = ("jpeg500",), *, limit: int | None = None) -> Path:
    """The photos as ``out/SET/photos/NAME.jpg`` for each of ``sets`` (originals copied to
    ``out/original/photos/``; ``limit``: only the first photos in the sets after ``jpeg500``); returns
    ``out/jpeg500``."""
    orig_dir = out / "original" / "photos"
    orig_dir.mkdir(parents=True, exist_ok=True)
    for set_name in dict.fromkeys(("jpeg500", *sets)):
        jpeg_dir = out / set_name / "photos"
        jpeg_dir.mkdir(parents=True, exist_ok=True)
        for photo, data in _encoded(sources()[:None if set_name == "jpeg500" else limit], set_name):
            if photo.path is not None and set_name == "jpeg500":
                shutil.copy(photo.path, orig_dir / photo.path.name)
            (jpeg_dir / f"{photo.name}.jpg").write_bytes(data)
    return out / "jpeg500"


def jpeg_files(folder: str | Path | None, *, prefix: str = "photos-") -> list[str]:
    """The ``*.jpg`` files under ``folder`` (recursively, sorted); without a folder, the ``jpeg500`` set
    written to a new temporary folder named ``prefix...``. Empty when ``folder`` holds no JPEG."""
    root = Path(folder) if folder else write_photos(Path(tempfile.mkdtemp(prefix=prefix)))
    return sorted(str(x) for x in root.rglob("*.jpg"))
