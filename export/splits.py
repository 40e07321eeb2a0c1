"""Which images an INT8 export calibrates on and controls its accuracy on: never the test images.

* **Validation** (the accuracy control's judge): ``--val-data`` when given; else the training run's own
  validation split, rebuilt from the checkpoint's saved config -- ``DATA/val`` when the run had one,
  otherwise the same stratified, seeded ``--val-fraction`` of ``DATA/train`` that chose ``best.pt``
  (:func:`training.datasets.stratified_split`). The rebuilt split must be the very images that chose the
  checkpoint: its digest is compared with the one the checkpoint records (``selection.digest``), and a split
  that differs is rebuilt once more without the images that do not decode (training, caching, leaves them out
  before it splits), and refused if it still differs (the data changed since training: "pass --val-data")
  rather than judged on training images. Only ImageFolder runs are rebuilt.
* **Calibration**: ``--calib-data`` when given; else the training images of that run *minus* the
  validation images held out of them.

The test split (``--data``) is only the final report and gate: it chooses nothing. So the validation and
calibration images are checked against the test images the export judges on (:func:`check_apart`): a
file that is one of them (the same path, a link, ``--data`` naming the data-set root whose ``test/``
it reads) is refused, and so is a set of which more than :data:`MAX_TEST_COPIES` are byte-for-byte
copies of test images (a copied test folder; a few duplicates between real splits are let through).
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from inference.image_files import image_files
from inference.images import read_image_file
from training.datasets import UNREADABLE, paths_digest, stratified_split
from training.formats import AUTO, detect_format
from training.image_folder import scan_image_folder

DEFAULT_VAL_IMAGES = 2000   # INT8's accuracy control judges on these
DEFAULT_CALIB_IMAGES = 300  # and calibrates on these
MAX_TEST_COPIES = 0.01      # share of validation (or calibration) images that may be copies of test images


@dataclass
class HeldOut:
    """Labelled validation images and the unlabelled calibration images, as file paths."""
    val_paths: list[str]
    val_labels: list[int]
    val_source: str
    calib_paths: list[str]
    calib_source: str


def _images_under(folder: str) -> list[str]:
    paths = image_files(folder, option="--calib-data")
    if not paths:
        raise ValueError(f"no images under {folder}")
    return paths


def _readable(paths: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """The images of ``paths`` that decode (as training's cache decodes them), with their labels."""
    keep = []
    for i, path in enumerate(paths):
        try:
            read_image_file(path)
            keep.append(i)
        except UNREADABLE:
            pass
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_apart(paths: list[str], test_paths: list[str] | tuple[str, ...], *, what: str, option: str,
                digests: dict[str, str] | None = None) -> None:
    """``ValueError`` when ``paths`` (validation or calibration images) are test images: any of the same
    file, or more than :data:`MAX_TEST_COPIES` of them identical in content to one. ``digests``: a cache of
    file digests shared by the calls of one export (the test images are read once, not once per set)."""
    if not paths or not test_paths:
        return
    cache = {} if digests is None else digests

    def digest(path: str) -> str:
        if path not in cache:
            cache[path] = _digest(path)
        return cache[path]
    test_files = {os.path.realpath(p) for p in test_paths}
    if same := [p for p in paths if os.path.realpath(p) in test_files]:
        raise ValueError(f"{len(same)} of the {len(paths)} {what} images are test images (e.g. {same[0]}): the test "
                         f"images judge the graph last; pass {option} with other images")
    sizes = {p: os.path.getsize(p) for p in (*paths, *test_paths)}  # only a file of the same size can be a copy
    mine = set(sizes[p] for p in paths)
    test_digests = {digest(p) for p in test_paths if sizes[p] in mine}
    theirs = set(sizes[p] for p in test_paths)
    copies = [p for p in paths if sizes[p] in theirs and digest(p) in test_digests]
    if len(copies) > MAX_TEST_COPIES * len(paths):
        raise ValueError(f"{len(copies)} of the {len(paths)} {what} images are copies of test images (e.g. {copies[0]}): "
                         f"the test images judge the graph last; pass {option} with other images")


def _labelled(folder: str, class_names: list[str]) -> tuple[list[str], list[int]]:
    classes, paths, labels = scan_image_folder(folder)
    if classes != list(class_names):
        raise ValueError(f"the classes of {folder} differ from the checkpoint's: {classes} vs {list(class_names)}")
    return paths, labels


PASS_BOTH = "pass --val-data (labelled, not the test split) and --calib-data"


def held_out(*, checkpoint_config: dict, class_names: list[str], val_data: str | None = None,
             calib_data: str | None = None, val_images: int = DEFAULT_VAL_IMAGES, calib_images: int = DEFAULT_CALIB_IMAGES,
             seed: int = 0, selection: dict | None = None, test_paths: tuple[str, ...] = ()) -> HeldOut:
    """The validation and calibration images for an INT8 export (see the module docstring). ``selection``: the
    checkpoint's record of the split that chose it (``digest``); a rebuilt split must be those very images.
    ``test_paths``: the test images the export judges on, which neither may be (:func:`check_apart`)."""
    cfg = checkpoint_config or {}
    root = cfg.get("data")
    train_dir = os.path.join(root, "train") if root else None
    train_paths = train_labels = held = None
    if val_data is None or calib_data is None:
        if not root or not os.path.isdir(train_dir):
            raise ValueError("INT8 needs held-out validation images and training images to calibrate on: "
                             + PASS_BOTH
                             + (f" (the training data {root} recorded in the checkpoint is not here)" if root else ""))
        fmt = cfg.get("format") or AUTO
        fmt = detect_format(root) if fmt == AUTO else fmt  # as training read it
        if fmt != "imagefolder":
            raise ValueError(f"the run's validation split is rebuilt from an ImageFolder tree only, and {root} is "
                             f"{fmt}: " + PASS_BOTH)
        train_paths, train_labels = _labelled(train_dir, class_names)
    if val_data is not None:
        val_paths, val_labels = _labelled(val_data, class_names)
        val_source = val_data
    else:
        recorded = (selection or {}).get("digest")
        folder = os.path.isdir(os.path.join(root, "val")) and os.path.isdir(os.path.join(root, "test"))
        val_root = os.path.join(root, "val") if folder else train_dir
        for readable_only in (False, True):  # training (caching) drops unreadable images before it splits: so do we
            if folder:
                val_paths, val_labels = _labelled(val_root, class_names)
                if readable_only:
                    val_paths, val_labels = _readable(val_paths, val_labels)
                val_source = val_root
            else:
                fraction = float(cfg.get("val_fraction") or 0)
                if fraction <= 0:
                    raise ValueError("the checkpoint's run held out no validation images (--val-fraction 0): pass "
                                     "--val-data")
                if readable_only:
                    train_paths, train_labels = _readable(train_paths, train_labels)
                keep, held = stratified_split(train_labels, fraction, seed=int(cfg.get("seed", 0)))
                val_paths, val_labels = [train_paths[i] for i in held], [train_labels[i] for i in held]
                val_source = f"the run's validation split ({fraction:g} of {train_dir}, seed {cfg.get('seed', 0)})"
            if not recorded or paths_digest(val_paths, val_labels, root=str(Path(val_root))) == recorded:
                break
        else:
            raise ValueError(f"the validation split rebuilt from {val_root} is not the one that chose this checkpoint "
                             "(its images differ: the data changed since training): pass --val-data (labelled, not "
                             "the test split)" + ("" if calib_data else " and --calib-data"))
    if calib_data is not None:
        calib_paths, calib_source = _images_under(calib_data), calib_data
    else:
        held_set = set(held or [])
        calib_paths = [p for i, p in enumerate(train_paths) if i not in held_set]
        calib_source = f"{train_dir} (without the validation images)" if held_set else train_dir
    overlap = set(map(os.path.abspath, calib_paths)) & set(map(os.path.abspath, val_paths))
    if overlap:
        raise ValueError(f"{len(overlap)} validation images are also calibration images (e.g. {sorted(overlap)[0]}): "
                         "keep --val-data and --calib-data apart")
    rng = random.Random(seed)
    if len(val_paths) > val_images:  # a stratified-enough sample: random, seeded
        idx = sorted(rng.sample(range(len(val_paths)), val_images))
        val_paths, val_labels = [val_paths[i] for i in idx], [val_labels[i] for i in idx]
    calib_paths = rng.sample(calib_paths, min(calib_images, len(calib_paths)))
    digests: dict[str, str] = {}
    check_apart(val_paths, test_paths, what="validation", option="--val-data", digests=digests)
    check_apart(calib_paths, test_paths, what="calibration", option="--calib-data", digests=digests)
    return HeldOut(val_paths, val_labels, f"{len(val_paths)} images of {val_source}", calib_paths,
                   f"{len(calib_paths)} images of {calib_source}")
