"""inference.folder_lock: one process at a time holds a folder's lock; the holder's PID is named; the lock
goes with its process however it ends; this process may take it again; released, its file is gone."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from inference.folder_lock import FolderBusy, folder_locked, holds, lock_folder, unlock_folder
from tools import REPO


def test_a_lock_held_by_another_process_names_it_until_that_process_is_killed(tmp_path):
    folder = tmp_path / "made-by-the-lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from inference.folder_lock import lock_folder
        lock_folder({str(folder)!r}, name=".x.lock")
        print("held", flush=True)
        time.sleep(60)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy) as busy:
            lock_folder(folder, name=".x.lock")
        assert busy.value.holder == str(holder.pid) and not holds(folder, name=".x.lock")
        lock_folder(folder, name=".y.lock")  # another name in the same folder is another lock
        unlock_folder(folder, name=".y.lock")
    finally:
        holder.kill()  # kill -9: no clean-up runs, the kernel drops the lock
        holder.wait()
    with folder_locked(folder, name=".x.lock"):
        assert (folder / ".x.lock").read_text() == f"{os.getpid()}\n"
        with folder_locked(folder, name=".x.lock"):  # this process again: fine, and kept after the inner block
            pass
        assert holds(folder, name=".x.lock")
    assert not holds(folder, name=".x.lock") and not (folder / ".x.lock").exists()
