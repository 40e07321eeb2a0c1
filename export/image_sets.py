"""The image sets an export is judged, calibrated and controlled on, decoded as the server decodes them
(:func:`inference.images.read_image_file`, the evaluation transform): labelled evaluation images (or random
ones), calibration images and validation images. An unreadable file is skipped and named on stderr, as
``train`` skips it, so that a gate never runs on fewer images than it says.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch

from inference.images import read_image_file
from inference.transforms import EvalPreset
from training.datasets import UNREADABLE, unreadable_line

DEFAULT_EVAL_IMAGES = 500  # labelled images for parity and accuracy


@dataclass
class EvalSet:
    """uint8 images at the model's input size (``crops``) and at the resize size (``full``, for
    five-crop TTA graphs), with labels when they came from a labelled folder."""
    crops: torch.Tensor
    full: torch.Tensor
    labels: torch.Tensor | None
    source: str
    paths: tuple[str, ...] = ()  # the files of a labelled set (none for random images)


def _read_readable(paths: list[str], *, min_side: int | None, what: str) -> tuple[list[torch.Tensor], list[int]]:
    """The files of ``paths`` as the server decodes them, and the indices of those read. An unreadable file (as
    ``train`` skips it: corrupt, truncated, not an image) is skipped and named on stderr, so that a gate never
    runs on fewer images than it says (the caller's count is of the readable ones); none readable is an error."""
    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            images.append(read_image_file(path, min_side=min_side))
            kept.append(i)
        except UNREADABLE as e:
            print(unreadable_line(path, e), file=sys.stderr)
    if not kept and paths:
        raise ValueError(f"none of the {len(paths)} {what} could be read (first: {paths[0]})")
    return images, kept


def _skipped(total: int, kept: int) -> str:
    return f" ({total - kept} unreadable skipped)" if kept < total else ""


def load_eval_set(data: str | None, spec, *, count: int, seed: int = 0) -> EvalSet:
    crop = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    full = EvalPreset(crop_size=spec.resize_size, resize_size=spec.resize_size)
    if data is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (count, 3, spec.resize_size, spec.resize_size), dtype=torch.uint8, generator=g)
        return EvalSet(crop(images), images, None, "random uint8 images")
    from training.evaluation import eval_dataset  # class folders, or a data-set root's test split, as evaluate

    ds = eval_dataset(data)
    data, classes, paths, labels = getattr(ds, "root", data), list(ds.classes), ds.paths, ds.labels.tolist()
    if classes != spec.class_names:
        raise ValueError(f"the classes of {data} differ from the checkpoint's: {classes} vs {spec.class_names}")
    idx = random.Random(seed).sample(range(len(paths)), min(count, len(paths)))
    decoded, kept = _read_readable([paths[i] for i in idx], min_side=crop.min_decode_side, what=f"images of {data}")
    return EvalSet(crop.batch(decoded), full.batch(decoded), torch.tensor([labels[idx[k]] for k in kept]),
                   f"{len(kept)} images of {data}{_skipped(len(idx), len(kept))}", tuple(paths[idx[k]] for k in kept))


def load_calibration(source: str | list[str], spec, *, count: int, seed: int = 1) -> torch.Tensor:
    """Calibration images need no labels: every image under the folder ``source`` (any layout), or the
    image files listed in ``source``, at the input size."""
    from inference.image_files import image_files

    if isinstance(source, str):
        paths = image_files(source, option="--calib-data")
        if not paths:
            raise ValueError(f"no calibration images under {source}")
    else:
        paths = list(source)
    paths = random.Random(seed).sample(paths, min(count, len(paths)))
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    return preset.batch(_read_readable(paths, min_side=preset.min_decode_side, what="calibration images")[0])


def load_labelled(paths: list[str], labels: list[int], spec) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images at the input size (decoded as the server decodes them) and their labels; unreadable files
    skipped and named (:func:`_read_readable`)."""
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    images, kept = _read_readable(paths, min_side=preset.min_decode_side, what="validation images")
    return preset.batch(images), torch.tensor([labels[k] for k in kept])
