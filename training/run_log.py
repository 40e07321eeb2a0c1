"""The run's epoch log: ``RUN/log.csv`` (one row per epoch, :data:`LOG_COLUMNS`; read back by
:func:`training.reports.read_log`) and, with ``--tensorboard``, the same scalars in ``RUN/tensorboard``."""
from __future__ import annotations

import csv
import os

LOG_FILE = "log.csv"
LOG_COLUMNS = ["epoch", "train_loss", "test_loss", "test_top1", "test_top5", "ema_top1", "lr", "seconds"]
SCALARS = ("train_loss", "test_loss", "test_top1", "test_top5", "ema_top1", "lr")  # what TensorBoard gets
_FORMATS = {"lr": "{:.3e}", "seconds": "{:.1f}", "epoch": "{}"}  # the rest: "{:.5f}"


def start_log(out: str, history: list[dict]) -> None:
    """Write ``out/log.csv``: the header and the rows of ``history`` (kept on ``--resume``)."""
    rows = [[h.get(c, "") for c in LOG_COLUMNS] for h in history]
    with open(os.path.join(out, LOG_FILE), "w", newline="") as f:
        csv.writer(f).writerows([LOG_COLUMNS, *rows])


def append_log(out: str, metrics: dict) -> None:
    """Append one epoch's ``metrics`` to ``out/log.csv`` (columns it lacks stay empty)."""
    row = [_FORMATS.get(c, "{:.5f}").format(metrics[c]) if c in metrics else "" for c in LOG_COLUMNS]
    with open(os.path.join(out, LOG_FILE), "a", newline="") as f:
        csv.writer(f).writerow(row)


def open_tensorboard(out: str):
    """A ``SummaryWriter`` on ``out/tensorboard``; a clear error without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter(os.path.join(out, "tensorboard"))


def add_scalars(writer, metrics: dict, epoch: int) -> None:
    """The epoch's :data:`SCALARS` that ``metrics`` has, to TensorBoard."""
    for key in SCALARS:
        if key in metrics:
            writer.add_scalar(key, metrics[key], epoch)
