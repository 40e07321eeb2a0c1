"""The export transaction: every file of a run is written and verified in a staging folder inside the
output folder (so on its file system), then moved in with ``os.replace``.

* :class:`Staging` -- ``OUT/.staging-<pid>-<random>/``, removed on success and on failure.
* :meth:`Staging.commit` -- fsyncs the staged files, writes a journal naming them (``export.json``
  last), then renames each into ``OUT``. Nothing else ever writes into ``OUT``.
* :func:`recover` -- run before an export: a staging folder whose process is gone is either finished
  (its journal was written: the rest of its renames are done, so the folder holds that run's
  graphs and the ``export.json`` that lists them) or removed (no journal: the run never reached
  its commit and ``OUT`` is untouched). A staging folder of a live process is left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from .atomic import fsync_dir, fsync_file, pid_alive, write_json

STAGING_PREFIX = ".staging-"
JOURNAL = ".commit.json"


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


def _owner(entry: str) -> int | None:
    pid = entry[len(STAGING_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


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
        journal = os.path.join(path, JOURNAL)
        try:
            with open(journal) as f:
                names = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            names = None  # no (complete) journal: that run never began its commit
        if names is not None:
            _move_in(staging=path, out=out, names=[str(n) for n in names])
            done.append(f"finished the interrupted commit of {entry}")
        else:
            done.append(f"removed the unfinished {entry}")
        shutil.rmtree(path, ignore_errors=True)
    for line in done:
        log(f"{out}: {line}")
    return done
