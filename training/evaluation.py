"""Offline evaluation and prediction of a checkpoint: metrics and plots on labelled images
(:func:`evaluate`), a predictions CSV for an unlabelled folder (:func:`predict_folder`), and
:func:`predict`, the batched TTA forward that the training loop's per-epoch evaluation uses too.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch import nn
from torch.utils.data import DataLoader

from inference.atomic import clean_stale, write_json
from inference.image_files import IMAGE_EXTENSIONS, image_files, skipped_line
from inference.images import read_image_file
from inference.transforms import normalize
from inference.tta import canvas_preset, predict_proba, view_problem

from .calibration import calibration_metrics, plot_reliability
from .checkpoint import ModelSpec, load_model
from .datasets import LazyDataset, ReadableImages, collate_readable, unreadable_line
from .formats import AUTO, FORMATS, build_datasets, detect_format
from .image_folder import ImageFolderDataset
from .progress import tqdm
from .reports import (
    classification_metrics,
    classification_report,
    plot_confusion_matrix,
    plot_per_class_accuracy,
    plot_training_curves,
    write_predictions_csv,
)
from .run_log import LOG_FILE
from .runtime import pick_device

FOLDER = "folder"  # --data is the class folders themselves
EVAL_FORMAT_CHOICES = (AUTO, FOLDER, *FORMATS)  # what eval_dataset(format=...) accepts
EVAL_PLOTS = ("confusion_matrix.png", "per_class_accuracy.png", "calibration.png", "training_curves.png")  # plots=True


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, spec: ModelSpec, *, device: torch.device, tta: str = "none",
            progress: bool = True, desc: str = "evaluate", bad: list | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(probabilities (N, K), labels (N,))`` in loader order; batches are TTA canvases
    (``inference.tta.canvas_preset``). Batches may be ``(images, labels, bad)``
    (:func:`training.datasets.collate_reporting`, :func:`~training.datasets.collate_readable`): the unreadable
    files go to ``bad`` when given; a batch of none readable (``images`` None) is skipped."""
    model.eval()
    forward = lambda x: model(normalize(x, mean=spec.mean, std=spec.std))  # noqa: E731
    probs, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=1.0):
        images, target = batch[0], batch[1]
        if bad is not None and len(batch) > 2:
            bad.extend(batch[2])
        if images is None:
            continue
        probs.append(predict_proba(forward, images.to(device), tta, crop_size=spec.input_size).float().cpu())
        labels.append(target)
    if not probs:
        raise ValueError(f"{desc}: none of the images could be read")
    return torch.cat(probs), torch.cat(labels)


def eval_dataset(data: str, *, format: str = AUTO, transform=None):
    """The labelled images to evaluate on: a class-folder tree (``DIR/test``), or the test split of any
    data-set root that ``train`` reads (ImageFolder root, iNaturalist JSON, CIFAR pickles)."""
    if format == AUTO:
        try:
            format = detect_format(data)
        except (ValueError, FileNotFoundError):
            format = FOLDER  # not a data-set root: the class folders themselves
    if format == FOLDER:
        return ImageFolderDataset(data, transform=transform, progress=False)
    return build_datasets(data, format=format, eval_transform=transform, progress=False)[1]


def check_tta(tta: str, spec: ModelSpec, *, option: str = "--tta") -> None:
    """Refuse, as the server refuses it (``inference.tta.view_problem``), a TTA whose views repeat one view of this
    model's canvas: five_crop on a model whose resize size is its input size scored five copies of the plain view
    and recorded them as five-crop TTA. ``option`` names what gave ``tta`` (``export`` checks its --graph-tta)."""
    problem = view_problem(tta, crop=spec.input_size, size=spec.resize_size)
    if problem:
        raise ValueError(f"{option} {tta}: {problem}; use flip, or a model trained with a larger --resize-size")


def evaluate(checkpoint: str, data: str, *, tta: str = "none", batch_size: int = 256, out_dir: str | None = None,
             device: str = "auto", progress: bool = True, plots: bool = True, format: str = AUTO) -> dict:
    """Evaluate a checkpoint on labelled images (see :func:`eval_dataset`): top-1/3/5, macro
    precision/recall/F1, per-class numbers and the confusion matrix; with ``out_dir``: metrics.json,
    predictions.csv and PNG plots. Unreadable files are skipped, named on stderr and listed in the metrics
    (``unreadable_images``), as ``train`` does on its test split; the numbers are over the readable ones."""
    dev = pick_device(device)
    spec, model = load_model(checkpoint)
    check_tta(tta, spec)
    model.to(dev)
    ds = eval_dataset(data, format=format, transform=canvas_preset(tta, crop_size=spec.input_size,
                                                                   resize_size=spec.resize_size))
    if list(ds.classes) != spec.class_names:
        raise ValueError(f"the classes of {data} ({ds.classes}) differ from the checkpoint's ({spec.class_names})")
    bad: list[tuple[str, str]] = []  # unreadable files: skipped, named and recorded, as train's test evaluation does
    probs, labels = predict(model, DataLoader(ReadableImages(ds), batch_size=batch_size, collate_fn=collate_readable),
                            spec, device=dev, tta=tta, progress=progress, bad=bad)
    for path, reason in bad:
        print(unreadable_line(path, reason), file=sys.stderr)
    metrics = {**classification_metrics(probs, labels, spec.class_names), **calibration_metrics(probs, labels),
               "tta": tta, "checkpoint": str(checkpoint),
               "data": str(data), "unreadable_images": [{"path": p, "reason": r} for p, r in bad]}
    metrics["report"] = classification_report(metrics)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for name in ("metrics.json", "predictions.csv", *EVAL_PLOTS):  # what a killed evaluation left half-written
            clean_stale(folder=out_dir, name=name)
        write_json(path=os.path.join(out_dir, "metrics.json"), obj=metrics)  # the numbers first, then the rest
        skipped = {p for p, _ in bad}
        write_predictions_csv(os.path.join(out_dir, "predictions.csv"), [p for p in ds.paths if p not in skipped],
                              labels, probs, spec.class_names)
        if plots:
            confusion, per_class, reliability, curves = (os.path.join(out_dir, name) for name in EVAL_PLOTS)
            metrics["plots"] = [plot_per_class_accuracy(metrics, per_class), plot_reliability(metrics, reliability)]
            if "confusion" in metrics:  # not above DENSE_CONFUSION_MAX classes: a picture of 100M cells shows nothing
                metrics["plots"].insert(0, plot_confusion_matrix(metrics["confusion"], spec.class_names, confusion))
            log_csv = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), LOG_FILE)
            if os.path.isfile(log_csv):
                metrics["plots"].append(plot_training_curves(log_csv, curves))
            write_json(path=os.path.join(out_dir, "metrics.json"), obj=metrics)  # again: with the plots it returns
            drawn = {os.path.abspath(p) for p in metrics["plots"]}
            for name in EVAL_PLOTS:  # an earlier evaluation's plot this one does not draw: it showed another run
                path = os.path.join(out_dir, name)
                if os.path.abspath(path) not in drawn and os.path.exists(path):
                    os.remove(path)
    return metrics


def predict_folder(checkpoint: str, images: str, *, out_csv: str, tta: str = "none", batch_size: int = 256,
                   device: str = "auto", topk: int = 1, progress: bool = True) -> int:
    """Predictions for an unlabelled folder (searched recursively) as CSV; returns the image count.

    A file that is not a readable image (corrupt, truncated, too large) is skipped, named on stderr with
    its reason, and left out of the CSV; none readable at all is an error."""
    skipped = Counter()
    paths = image_files(images, skipped=skipped)
    if skipped:  # e.g. an iPhone's .heic photos, passed over in silence before
        print(skipped_line(skipped), file=sys.stderr)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {images}")
    if topk < 1 or batch_size < 1:
        raise ValueError(f"--topk and --batch-size must be at least 1, got {topk} and {batch_size}")
    dev = pick_device(device)
    spec, model = load_model(checkpoint)
    check_tta(tta, spec)
    model.to(dev)
    preset = canvas_preset(tta, crop_size=spec.input_size, resize_size=spec.resize_size)
    blank = preset(torch.zeros((3, 8, 8), dtype=torch.uint8))  # stands in for a skipped file in its batch
    bad: dict[int, str] = {}

    def load(i: int) -> torch.Tensor:
        try:
            return preset(read_image_file(paths[i], min_side=preset.min_decode_side))
        except (OSError, ValueError) as e:  # inference.images.ImageError is a ValueError
            bad[i] = str(e)
            return blank

    probs, _ = predict(model, DataLoader(LazyDataset(len(paths), load, label=-1), batch_size=batch_size), spec,
                       device=dev, tta=tta, progress=progress, desc="predict")
    for i, reason in sorted(bad.items()):
        print(unreadable_line(paths[i], reason), file=sys.stderr)
    if len(bad) == len(paths):
        raise ValueError(f"none of the {len(paths)} files under {images} is a readable image (first: {paths[0]}: "
                         f"{bad[0]})")
    keep = [i for i in range(len(paths)) if i not in bad]
    write_predictions_csv(out_csv, [paths[i] for i in keep], None, probs[keep], spec.class_names, topk=topk)
    return len(keep)
