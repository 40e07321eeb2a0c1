"""inference.folder_lock: one process at a time holds a folder's lock; the holder's PID is named; the lock
goes with its process however it ends; this process may take it again; released, its file is gone."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from inference.folder_lock import _HELD, FolderBusy, folder_locked, holds, lock_folder, unlock_folder
from tests.conftest import lock_held_elsewhere
from tools import REPO


def test_a_lock_held_by_another_process_names_it_until_that_process_is_killed(tmp_path):
    folder = tmp_path / "made-by-the-lock"
    with lock_held_elsewhere(folder, ".x.lock") as holder:
        with pytest.raises(FolderBusy) as busy:
            lock_folder(folder, name=".x.lock")
        assert busy.value.holder == str(holder.pid) and not holds(folder, name=".x.lock")
        lock_folder(folder, name=".y.lock")  # another name in the same folder is another lock
        unlock_folder(folder, name=".y.lock")
    with folder_locked(folder, name=".x.lock"):
        assert (folder / ".x.lock").read_text() == f"{os.getpid()}\n"
        with folder_locked(folder, name=".x.lock"):  # this process again: fine, and kept after the inner block
            pass
        assert holds(folder, name=".x.lock")
    assert not holds(folder, name=".x.lock") and not (folder / ".x.lock").exists()


def test_a_lock_released_within_the_wait_is_taken_and_one_removed_on_release_is_never_shared(tmp_path):
    """`make stop && make serve`: the stopped `serve` releases its lock a moment after Java exits, and the new one
    waits for it. A process that opened the lock file just before its holder removed it must not lock that
    removed file beside the next holder of the new one."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from inference.folder_lock import lock_folder, unlock_folder
        lock_folder({str(tmp_path)!r}, name=".x.lock")
        print("held", flush=True)
        time.sleep(0.5)
        unlock_folder({str(tmp_path)!r}, name=".x.lock")
        time.sleep(30)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy):
            lock_folder(tmp_path, name=".x.lock")  # no wait: refused at once
        lock_folder(tmp_path, name=".x.lock", wait=10)  # released within the wait: taken
        assert holds(tmp_path, name=".x.lock")
    finally:
        holder.kill()
        holder.wait()
        unlock_folder(tmp_path, name=".x.lock")
    import fcntl
    real_flock, opened = fcntl.flock, []

    def flock_then_unlink(fd, op):  # the holder removes the file between our open() and our flock()
        real_flock(fd, op)
        if not opened:
            opened.append(fd)
            os.remove(tmp_path / ".y.lock")
    fcntl.flock = flock_then_unlink
    try:
        lock_folder(tmp_path, name=".y.lock")
    finally:
        fcntl.flock = real_flock
    assert len(opened) == 1 and (tmp_path / ".y.lock").read_text() == f"{os.getpid()}\n"  # locked at the path
    assert os.path.samestat(os.fstat(_HELD[str(tmp_path.resolve() / ".y.lock")]), os.stat(tmp_path / ".y.lock"))
    unlock_folder(tmp_path, name=".y.lock")
