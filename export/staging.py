"""The export transaction: every file of a run is written and verified in a staging folder inside the
output folder (so on its file system), then moved in with ``os.replace``.

* :class:`Staging` -- ``OUT/.staging-<pid>-<random>/``, removed on success and on failure; a failure or
  Ctrl-C during the commit's renames finishes them first (or, when that fails too, leaves the folder to
  :func:`recover`), so ``OUT`` never keeps half of a commit.
* :meth:`Staging.commit` -- fsyncs the staged files, writes a journal naming them (``export.json``
  last), then renames each into ``OUT``. Nothing else ever writes into ``OUT``.
* :func:`one_export` -- held around a whole export: a second export into the same ``OUT`` is refused
  (:mod:`inference.folder_lock`): two exports would each merge the manifest they read at their start, and
  the later commit would drop the other's entries.
* :func:`recover` -- run before an export: a staging folder whose process is gone is either finished
  (its journal was written: the rest of its renames are done, so the folder holds that run's
  graphs and the ``export.json`` that lists them) or removed (no journal: the run never reached
  its commit and ``OUT`` is untouched). A staging folder of a live process is left alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator

from inference.atomic import fsync_dir, fsync_file, pid_alive, write_json
from inference.cli import UsageError
from inference.folder_lock import FolderBusy, folder_locked

STAGING_PREFIX = ".staging-"
JOURNAL = ".commit.json"
EXPORT_LOCK = ".export.lock"  # held (flock) by the export writing into the folder; holds its PID


@contextlib.contextmanager
def one_export(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``OUT/.export.lock`` for the block; :class:`UsageError` while another export holds it."""
    try:
        with folder_locked(out, name=EXPORT_LOCK):
            yield
    except FolderBusy as e:
        raise UsageError(f"{os.fspath(out)}: another export is writing into it (PID {e.holder}); wait for it, or "
                         "export into another --out") from None


class Staging:
    """``with Staging(out=OUT) as staging:`` write into ``staging.path``, then ``staging.commit(names)``."""

    def __init__(self, *, out: str | os.PathLike):
        self.out = os.fspath(out)
        self.path = ""

    def __enter__(self) -> Staging:
        os.makedirs(self.out, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out)
        return self

    def __exit__(self, *exc) -> None:
        if os.path.isfile(self.file(JOURNAL)):  # the commit began: finish it, or leave it to recover()
            try:
                _move_in(staging=self.path, out=self.out, names=_journal(self.path))
            except BaseException:  # a second Ctrl-C, a full disk: the next export's recover() finishes it
                return
        shutil.rmtree(self.path, ignore_errors=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def commit(self, names: list[str]) -> None:
        """Move ``names`` (files in the staging folder) into the output folder, in this order."""
        missing = [n for n in names if not os.path.isfile(self.file(n))]
        if missing:
            raise FileNotFoundError(f"nothing staged as {', '.join(missing)}")
        for name in names:
            fsync_file(self.file(name))
        write_json(path=self.file(JOURNAL), obj={"files": names})
        _move_in(staging=self.path, out=self.out, names=names)


def _move_in(*, staging: str, out: str, names: list[str]) -> None:
    for name in names:
        src = os.path.join(staging, name)
        if os.path.exists(src):  # a resumed commit skips what was already moved
            os.replace(src, os.path.join(out, name))
    fsync_dir(out)


def _journal(path: str) -> list[str] | None:
    """The files a staging folder's commit moves in, or None where it never wrote its (whole) journal."""
    try:
        with open(os.path.join(path, JOURNAL)) as f:
            return [str(n) for n in json.load(f)["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _owner(entry: str) -> int | None:
    """The PID in a staging folder's name, matched as tempfile.mkdtemp writes it (8 characters after the prefix),
    so that a user's own ".staging-2024-notes" is not taken for the folder of a dead PID 2024."""
    m = re.fullmatch(re.escape(STAGING_PREFIX) + r"(\d+)-[a-z0-9_]{8}", entry)
    return int(m.group(1)) if m else None


def recover(*, out: str | os.PathLike, log=print) -> list[str]:
    """Finish or remove the staging folders of ``out`` whose process is gone; return what was done."""
    out = os.fspath(out)
    done = []
    if not os.path.isdir(out):
        return done
    for entry in sorted(os.listdir(out)):
        path = os.path.join(out, entry)
        pid = _owner(entry) if entry.startswith(STAGING_PREFIX) else None
        if pid is None or not os.path.isdir(path) or (pid != os.getpid() and pid_alive(pid)):
            continue
        names = _journal(path)  # None: that run never began its commit
        if names is not None:
            _move_in(staging=path, out=out, names=names)
            done.append(f"finished the interrupted commit of {entry}")
        else:
            done.append(f"removed the unfinished {entry}")
        shutil.rmtree(path, ignore_errors=True)
    for line in done:
        log(f"{out}: {line}")
    return done
