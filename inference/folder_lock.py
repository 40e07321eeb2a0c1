"""One writer per folder: an exclusive ``flock`` on a lock file in the folder, held for as long as a
process writes there.

Training holds ``RUN/.training.lock`` while it trains into a run folder, an export ``OUT/.export.lock``
while it writes graphs and their manifest, ``make serve`` ``.torchserve/serve.lock`` while it runs
TorchServe. A second process asking for a held lock is refused at once (:class:`FolderBusy`, naming the
holder's PID, which the lock file holds) instead of writing beside the first (two exports merging one
manifest each lose the other's entries; two trainings interleave checkpoints). The kernel drops the lock
when its process ends, however it ends (Ctrl-C, kill -9, out of memory), so a crash never leaves the folder
blocked, and a PID number reused by another process means nothing. Standard library only, like
:mod:`inference.atomic`: ``make stop``'s and training's imports stay light.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

_HELD: dict[str, int] = {}  # lock file (real path) -> the open file this process holds it with


class FolderBusy(Exception):
    """Another live process holds the lock; ``holder``: its PID as the lock file says (``"?"``: not yet written)."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is held by PID {holder}")
        self.path, self.holder = path, holder


def _key(folder: str | os.PathLike, name: str) -> str:
    return os.path.join(os.path.realpath(folder), name)


def lock_folder(folder: str | os.PathLike, *, name: str, wait: float = 0.0) -> None:
    """Hold ``folder/name`` exclusively until :func:`unlock_folder` or this process's end (made with the
    folder where missing). Holding it already in this process is fine; another process holding it raises
    :class:`FolderBusy`, at once or after trying for ``wait`` seconds (a holder that is exiting)."""
    key = _key(folder, name)
    if key in _HELD:
        return
    os.makedirs(folder, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise FolderBusy(key, holder) from None
            time.sleep(0.1)
            continue
        if _same_file(fd, key):
            break
        os.close(fd)  # locked a file its holder removed on release: the lock is the one at the path now
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def unlock_folder(folder: str | os.PathLike, *, name: str) -> None:
    """Release :func:`lock_folder`'s lock and remove its file (the writer leaves nothing of it behind)."""
    key = _key(folder, name)
    fd = _HELD.pop(key, None)
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(key)
        os.close(fd)


def holds(folder: str | os.PathLike, *, name: str) -> bool:
    """Whether this process holds ``folder/name``."""
    return _key(folder, name) in _HELD


@contextlib.contextmanager
def folder_locked(folder: str | os.PathLike, *, name: str, wait: float = 0.0) -> Iterator[None]:
    """``with folder_locked(OUT, name=...):`` hold the lock for the block (:func:`lock_folder`); release it
    after, unless this process held it already before the block."""
    held = holds(folder, name=name)
    lock_folder(folder, name=name, wait=wait)
    try:
        yield
    finally:
        if not held:
            unlock_folder(folder, name=name)
