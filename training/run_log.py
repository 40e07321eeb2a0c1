"""The run's files besides the checkpoints.

* ``RUN/log.csv``: one row per epoch (:data:`LOG_COLUMNS`; read back by :func:`training.reports.read_log`).
  Every accuracy and loss in it is on the **validation** split (``val_*`` columns; ``val_top1_ema``:
  the EMA weights); ``bad_images`` counts the unreadable training images skipped so far.
* ``RUN/test_metrics.json``: the **test** split, evaluated once, at the end, with ``best.pt``
  (:func:`write_test_metrics`); the test split is never read during training.
* with ``--tensorboard``, the epoch scalars in ``RUN/tensorboard``.

Who owns a run folder, and what happens to the run a new one replaces, is :mod:`training.run_folder`.
"""
from __future__ import annotations

import csv
import io
import os

from inference.atomic import write_bytes, write_json

LOG_FILE = "log.csv"
TEST_METRICS_FILE = "test_metrics.json"
LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema", "lr", "seconds",
               "bad_images"]
SCALARS = ("train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema", "lr")  # what TensorBoard gets
_FORMATS = {"lr": "{:.3e}", "seconds": "{:.1f}", "epoch": "{}", "bad_images": "{}"}  # the rest: "{:.5f}"


def _row(metrics: dict) -> list[str]:
    """One epoch's row: its :data:`LOG_COLUMNS` formatted (columns it lacks, or holds as text, as they are)."""
    return [_FORMATS.get(c, "{:.5f}").format(metrics[c]) if isinstance(metrics.get(c), (int, float))
            else metrics.get(c, "") for c in LOG_COLUMNS]


def start_log(out: str, history: list[dict]) -> None:
    """Write ``out/log.csv``: the header and the rows of ``history`` (kept on ``--resume``), formatted as
    :func:`append_log` formats them."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows([LOG_COLUMNS, *map(_row, history)])
    write_bytes(path=os.path.join(out, LOG_FILE), data=text.getvalue().encode())  # a resumed run's history too


def append_log(out: str, metrics: dict) -> None:
    """Append one epoch's ``metrics`` to ``out/log.csv`` (columns it lacks stay empty)."""
    with open(os.path.join(out, LOG_FILE), "a", newline="") as f:
        csv.writer(f).writerow(_row(metrics))


def write_test_metrics(out: str, metrics: dict) -> str:
    """``out/test_metrics.json``: the final test-split evaluation (``"split": "test"``); returns its path."""
    path = os.path.join(out, TEST_METRICS_FILE)
    write_json(path=path, obj=metrics)
    return path


def open_tensorboard(out: str):
    """A ``SummaryWriter`` on ``out/tensorboard``; a clear error without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(os.path.join(out, "tensorboard"))


def add_scalars(writer, metrics: dict, epoch: int) -> None:
    """The epoch's :data:`SCALARS` that ``metrics`` has, to TensorBoard."""
    for key in SCALARS:
        if key in metrics:
            writer.add_scalar(key, metrics[key], epoch)
