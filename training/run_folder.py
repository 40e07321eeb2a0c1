"""The run folder: its files, and one run in it at a time.

:func:`claim_run_folder` keeps one run per folder: a second ``train --out RUN`` is refused while RUN holds
a run (its :data:`RUN_FILES`), unless it resumes that run or ``--force`` replaces it; a run stopped before
its first epoch ended (a ``log.csv`` of ours and no checkpoint) is replaced, as there is nothing to resume, unless a
live process is still training into it (:func:`lock_run_folder`): a folder is never written by two runs at once.
A replaced run's files are kept aside until the new run's first checkpoint (:func:`set_aside`): a ``--force``
run that fails or is stopped before it leaves the old run as it was. The epoch log and the test metrics
are :mod:`training.run_log`.
"""
from __future__ import annotations

import csv
import os
import shutil
import time

from inference.atomic import clean_stale
from inference.folder_lock import FolderBusy, holds, lock_folder, unlock_folder

from .run_log import LOG_COLUMNS, LOG_FILE, TEST_METRICS_FILE

CONFIG_FILE = "config.yaml"
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.pt", "last.pt"
CHECKPOINTS = (BEST_CHECKPOINT, LAST_CHECKPOINT)
RUN_FILES = (*CHECKPOINTS, LOG_FILE, TEST_METRICS_FILE)  # what makes a folder hold a run
LOCK_FILE = ".training.lock"  # locked (flock) by the process training into the folder; holds its PID
SET_ASIDE = ".replaced"  # the files of the run that --force replaces, until the new run's first checkpoint
RUN_OUTPUTS = ("tensorboard", "eval")  # folders of a run's other outputs (--tensorboard; evaluate's default --out)


def claim_run_folder(out: str, *, resume: str | None = None, force: bool = False, lock: bool = True) -> list[str]:
    """Refuse (``ValueError``) an ``out`` that holds another run, before any work; returns the files that
    ``force`` will replace (set aside by :func:`set_aside` when the run starts, removed at its first
    checkpoint). Resuming a checkpoint of ``out`` itself continues that run there."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: a run needs a folder (e.g. runs/NAME)")
    if lock:  # never two processes writing one folder, --force or not (lock: the process that writes: rank 0)
        lock_run_folder(out)
        restore_set_aside(out)  # a forced run killed before its first checkpoint: the run it replaced returns
        for name in (*RUN_FILES, CONFIG_FILE):  # the half-written temporaries a killed run left
            clean_stale(folder=out, name=name)
    try:
        return _replaced_files(out, resume=resume, force=force)
    except ValueError:
        unlock_run_folder(out)
        raise


def _replaced_files(out: str, *, resume: str | None, force: bool) -> list[str]:
    held = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if resume and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(out):
        return []
    config = [name for name in (CONFIG_FILE,) if os.path.exists(os.path.join(out, name))]
    if not held:  # a run writes config.yaml and log.csv together: a config.yaml alone is someone's recipe
        if not os.path.isfile(os.path.join(out, CONFIG_FILE)):
            return []
        if not force:
            raise ValueError(f"--out {out} holds a {CONFIG_FILE} that no run wrote (your --config?): the run writes "
                             "its options there; choose a new --out, or pass --force to replace it")
        return config
    if held == [LOG_FILE] and not _our_log(out) and not force:
        raise ValueError(f"--out {out} holds a {LOG_FILE} that is no training log: the run writes its epochs there; "
                         "choose a new --out, or pass --force to replace it")
    # what the replaced run's evaluate and TensorBoard wrote goes too: never mixed with the new run's
    outputs = [name for name in RUN_OUTPUTS if os.path.isdir(os.path.join(out, name))]
    if held == [LOG_FILE]:  # a run stopped (Ctrl-C) before its first epoch ended: nothing to keep
        return held + config + outputs
    if not force:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}): resume it with --resume "
                         f"{os.path.join(out, 'last.pt')}, choose a new --out, or pass --force to replace it")
    return held + config + outputs


def _our_log(out: str) -> bool:
    """Whether ``out/log.csv`` starts as :func:`training.run_log.start_log` writes it (and wrote it before
    ``val_loss`` was ``test_loss``)."""
    path = os.path.join(out, LOG_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, newline="", errors="replace") as f:
        return next(csv.reader([f.readline()]), [])[:2] == LOG_COLUMNS[:2]


def lock_run_folder(out: str) -> None:
    """Hold ``RUN/.training.lock`` (:mod:`inference.folder_lock`) for as long as this process trains into
    ``out``: another run into the folder is refused (``ValueError``) while it is held."""
    try:
        lock_folder(out, name=LOCK_FILE)
    except FolderBusy as e:
        raise ValueError(f"--out {out}: a run is training into it (PID {e.holder}); wait for it, stop it, or choose "
                         "a new --out") from None


def unlock_run_folder(out: str) -> None:
    """Release the lock of :func:`lock_run_folder` and remove its file (the run leaves nothing of it behind)."""
    unlock_folder(out, name=LOCK_FILE)


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
            if os.path.isdir(os.path.join(out, name)):  # the new run's tensorboard/: a folder is not replaced by rename
                shutil.rmtree(os.path.join(out, name))
            os.replace(os.path.join(aside, name), os.path.join(out, name))
            restored.append(name)
    shutil.rmtree(aside, ignore_errors=True)
    return restored


def restore_killed_run(out: str, *, rank: int | None = None, wait: float = 60.0) -> None:
    """Put back the run that a ``--force`` run killed before its first checkpoint left in ``RUN/.replaced/``
    (under the folder's lock: never under a live run, whose lock refuses this with a clear line). Under torchrun
    (``rank``: ``RANK``) rank 0 puts it back and the other ranks wait up to ``wait`` seconds for it: each taking
    the lock, all but one were refused."""
    aside = os.path.join(out, SET_ASIDE)
    if not os.path.isdir(aside):
        return
    if (os.environ.get("RANK", "0").strip() not in ("", "0")) if rank is None else rank != 0:
        deadline = time.monotonic() + wait
        while os.path.isdir(aside) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    held = holds(out, name=LOCK_FILE)
    lock_run_folder(out)
    try:
        restore_set_aside(out)
    finally:
        if not held:
            unlock_run_folder(out)


def drop_set_aside(out: str) -> None:
    """The new run has its first checkpoint: the replaced run's files go."""
    shutil.rmtree(os.path.join(out, SET_ASIDE), ignore_errors=True)
