"""The run's files besides the checkpoints.

* ``RUN/log.csv``: one row per epoch (:data:`LOG_COLUMNS`; read back by :func:`training.reports.read_log`).
  Every accuracy and loss in it is on the **validation** split (``val_*`` columns; ``val_top1_ema``:
  the EMA weights); ``bad_images`` counts the unreadable training images skipped so far.
* ``RUN/test_metrics.json``: the **test** split, evaluated once, at the end, with ``best.pt``
  (:func:`write_test_metrics`); the test split is never read during training.
* with ``--tensorboard``, the epoch scalars in ``RUN/tensorboard``.

:func:`claim_run_folder` keeps one run per folder: a second ``train --out RUN`` is refused while RUN holds
a run (its :data:`RUN_FILES`), unless it resumes that run or ``--force`` replaces it; a run stopped before
its first epoch ended (a ``log.csv`` and no checkpoint) is replaced, as there is nothing to resume, unless a
live process is still training into it (:func:`lock_run_folder`): a folder is never written by two runs at once.
A replaced run's files are kept aside until the new run's first checkpoint (:func:`set_aside`): a ``--force``
run that fails or is stopped before it leaves the old run as it was.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import shutil

from inference.atomic import write_bytes, write_json

LOG_FILE = "log.csv"
TEST_METRICS_FILE = "test_metrics.json"
LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema", "lr", "seconds",
               "bad_images"]
SCALARS = ("train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema", "lr")  # what TensorBoard gets
CONFIG_FILE = "config.yaml"
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.pt", "last.pt"
CHECKPOINTS = (BEST_CHECKPOINT, LAST_CHECKPOINT)
RUN_FILES = (*CHECKPOINTS, LOG_FILE, TEST_METRICS_FILE)  # what makes a folder hold a run
LOCK_FILE = ".training.lock"  # locked (flock) by the process training into the folder; holds its PID
SET_ASIDE = ".replaced"  # the files of the run that --force replaces, until the new run's first checkpoint
_FORMATS = {"lr": "{:.3e}", "seconds": "{:.1f}", "epoch": "{}", "bad_images": "{}"}  # the rest: "{:.5f}"


def claim_run_folder(out: str, *, resume: str | None = None, force: bool = False, lock: bool = True) -> list[str]:
    """Refuse (``ValueError``) an ``out`` that holds another run, before any work; returns the files that
    ``force`` will replace (set aside by :func:`set_aside` when the run starts, removed at its first
    checkpoint). Resuming a checkpoint of ``out`` itself continues that run there."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: a run needs a folder (e.g. runs/NAME)")
    if lock:  # never two processes writing one folder, --force or not (lock: the process that writes: rank 0)
        lock_run_folder(out)
        restore_set_aside(out)  # a forced run killed before its first checkpoint: the run it replaced returns
    try:
        return _replaced_files(out, resume=resume, force=force)
    except ValueError:
        unlock_run_folder(out)
        raise


def _replaced_files(out: str, *, resume: str | None, force: bool) -> list[str]:
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if not held or (resume and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(out)):
        return []
    config = [name for name in (CONFIG_FILE,) if os.path.exists(os.path.join(out, name))]
    if held == [LOG_FILE]:  # a run stopped (Ctrl-C) before its first epoch ended: no checkpoint, nothing to keep
        return held + config
    if not force:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}): resume it with --resume "
                         f"{os.path.join(out, 'last.pt')}, choose a new --out, or pass --force to replace it")
    return held + config


_LOCKS: dict[str, int] = {}  # run folder (real path) -> the open lock file this process holds


def lock_run_folder(out: str) -> None:
    """Hold an exclusive lock on ``RUN/.training.lock`` for as long as this process trains into ``out``:
    another run into the folder is refused (``ValueError``) while it is held. The kernel drops the lock when the
    process ends, however it ends (Ctrl-C, kill -9, out of memory), so a crash never leaves the folder blocked,
    and a PID number reused by another process means nothing."""
    key = os.path.realpath(out)
    if key in _LOCKS:  # this process holds it already (a second Trainer in one program)
        return
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"--out {out}: a run is training into it (PID {holder}); wait for it, stop it, or choose "
                         "a new --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd


def unlock_run_folder(out: str) -> None:
    """Release the lock of :func:`lock_run_folder` and remove its file (the run leaves nothing of it behind)."""
    fd = _LOCKS.pop(os.path.realpath(out), None)
    if fd is not None:
        try:
            os.remove(os.path.join(out, LOCK_FILE))
        except FileNotFoundError:
            pass
        os.close(fd)


def set_aside(out: str, names: list[str]) -> None:
    """Move the replaced run's files (``--force``) into ``RUN/.replaced/`` as the new run starts, so that none
    of them mixes with it: the new run's first checkpoint removes them (:func:`drop_set_aside`); a new run that
    fails, is stopped or is killed before it puts them back (:func:`restore_set_aside`)."""
    if not names:
        return
    aside = os.path.join(out, SET_ASIDE)
    os.makedirs(aside, exist_ok=True)
    for name in names:
        try:
            os.replace(os.path.join(out, name), os.path.join(aside, name))
        except FileNotFoundError:
            pass


def restore_set_aside(out: str) -> list[str]:
    """Put the files of :func:`set_aside` back where the new run has no checkpoint (it ended before its first
    one: the replaced run is still the folder's run), replacing the new run's config and log; returns their
    names. Where the new run has a checkpoint they are removed."""
    aside = os.path.join(out, SET_ASIDE)
    if not os.path.isdir(aside):
        return []
    restored = []
    if not any(os.path.exists(os.path.join(out, name)) for name in CHECKPOINTS):
        for name in sorted(os.listdir(aside)):
            os.replace(os.path.join(aside, name), os.path.join(out, name))
            restored.append(name)
    shutil.rmtree(aside, ignore_errors=True)
    return restored


def restore_killed_run(out: str) -> None:
    """Put back the run that a ``--force`` run killed before its first checkpoint left in ``RUN/.replaced/``
    (under the folder's lock: never under a live run, whose lock refuses this with a clear line)."""
    if not os.path.isdir(os.path.join(out, SET_ASIDE)):
        return
    held = os.path.realpath(out) in _LOCKS
    lock_run_folder(out)
    try:
        restore_set_aside(out)
    finally:
        if not held:
            unlock_run_folder(out)


def drop_set_aside(out: str) -> None:
    """The new run has its first checkpoint: the replaced run's files go."""
    shutil.rmtree(os.path.join(out, SET_ASIDE), ignore_errors=True)


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
