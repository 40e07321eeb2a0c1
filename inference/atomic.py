"""Crash-safe replacement of files and folders: the new bytes go to a temporary name in the destination's
own folder (same file system), are fsynced, then ``os.replace``-d onto the final name.

A reader sees the old file or the new one, never a part; a failure removes the temporary; a killed
process leaves at worst a hidden ``.NAME.<pid>.<random>.tmp`` that :func:`clean_stale` removes
once that process is gone.

Torch-free on purpose: training's checkpoints, export's graphs and archives, and the server scripts' state
files all write through it, and ``make stop`` must not pay for importing torch before it signals.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from typing import BinaryIO, Iterator


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (this one always does); tells a killed writer's leftover
    temporary from a live writer's."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (Linux reports it; elsewhere it is read by setting it and putting it back)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(default: int) -> int:
    """The mode of a newly created file (``default`` 0o666) or folder (0o777): ``default`` less the umask. A
    temporary is created 0600 (a folder 0700) and would carry that onto the final name: a .mar or checkpoint
    that the serving user (a container's user 1000) could not read. Every write gets it, a replacement too
    (the new file is a new inode), so that files written 0600 before this rule get readable again."""
    return default & ~umask()


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def replacing(dst: str | os.PathLike) -> Iterator[BinaryIO]:
    """A file to write ``dst``'s new bytes into: a temporary in ``dst``'s folder, fsynced and
    ``os.replace``-d onto ``dst`` when the block ends, removed if it raises."""
    folder, name = os.path.split(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _mode(0o666))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, dst)
        except IsADirectoryError:  # named as the user knows it, not as our temporary
            raise IsADirectoryError(errno.EISDIR, "is a folder, where a file is to be written", os.fspath(dst)) from None
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(folder)


def write_bytes(*, path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as f:
        f.write(data)


def write_json(*, path: str | os.PathLike, obj) -> None:
    write_bytes(path=path, data=(json.dumps(obj, indent=1) + "\n").encode())


def copy_stream(*, src: BinaryIO, dst: BinaryIO) -> None:
    """Copy the open file ``src`` to the open file ``dst`` in 1 MiB blocks."""
    shutil.copyfileobj(src, dst, 1 << 20)


def publish_file(*, src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` (any file system) onto ``dst``: through a temporary in ``dst``'s folder."""
    with open(src, "rb") as inp, replacing(dst) as out:
        copy_stream(src=inp, dst=out)


OLD_MARK = "old-"  # a replaced folder moved aside (see swap_in): put back by clean_stale if its process died


def temp_tree(dst: str | os.PathLike) -> str:
    """A new empty hidden folder beside ``dst`` (mode as the umask gives folders) to build ``dst``'s
    replacement in, then :func:`swap_in`; what a killed process left there :func:`clean_stale` removes."""
    folder, name = os.path.split(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(name), suffix=".tmp", dir=folder)
    os.chmod(tmp, _mode(0o777))  # mkdtemp's is 0700
    return tmp


def swap_in(*, tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the complete folder ``tmp`` (made by :func:`temp_tree`) in place of ``dst``. Folders cannot be
    replaced in one rename: an existing ``dst`` is renamed aside, ``tmp`` renamed in, the old one removed.
    A failure puts the old one back; a process killed between the two renames leaves it aside under a name
    that :func:`clean_stale` recognises and puts back."""
    folder, name = os.path.split(os.path.abspath(dst))
    old = None
    try:
        if os.path.lexists(dst):
            old = tempfile.mkdtemp(prefix=_temp_prefix(name) + OLD_MARK, suffix=".tmp", dir=folder)
            os.replace(dst, old)  # onto the empty folder just made
        os.replace(tmp, dst)
    except BaseException:
        if old is not None and not os.path.lexists(dst):
            os.replace(old, dst)  # put the earlier one back
            old = None
        _remove(str(tmp))
        raise
    finally:
        if old is not None:
            _remove(old)
    fsync_dir(folder)


def publish_tree(*, src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the folder ``src`` onto ``dst``: the copy is complete before ``dst`` changes (:func:`swap_in`)."""
    tmp = temp_tree(dst)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.chmod(tmp, _mode(0o777))  # copytree's copystat gave it the source's mode
    except BaseException:
        _remove(tmp)
        raise
    swap_in(tmp=tmp, dst=dst)


def clean_stale(*, folder: str | os.PathLike, name: str) -> list[str]:
    """Remove the temporaries of ``folder/name`` that processes no longer alive left, but put back an earlier
    ``name`` that one of them had moved aside (:func:`swap_in`) when ``name`` is missing; return their names."""
    # exactly _temp_prefix(name) + [OLD_MARK] + tempfile's random letters + ".tmp": never a sibling's, such as
    # those of "name.2024" (whose ".name.2024.PID..." would otherwise read as PID 2024)
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.({re.escape(OLD_MARK)})?[a-z0-9_]+\.tmp")
    removed = []
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not pid_alive(pid):
            path, dst = os.path.join(folder, entry), os.path.join(folder, name)
            if m.group(2) and not os.path.lexists(dst):
                os.replace(path, dst)  # killed between its two renames: the earlier one comes back
            else:
                _remove(path)
            removed.append(entry)
    return removed
