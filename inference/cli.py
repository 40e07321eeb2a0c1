"""How the project's command lines end on a user's mistake: one line on stderr saying what to do, exit
status 2, no traceback.

Every ``__main__`` of the project (``python -m training``, ``python -m export``, ``python -m benchmarks.bench``,
``python -m scripts.ts_server``, ``python -m scripts.soak``, ...) runs its ``main`` through :func:`run`. A
mistake is :class:`UsageError` (raised where the code knows what the user should do), a missing,
misplaced or unreadable path (``FileNotFoundError``, ``FileExistsError`` -- a file where a folder is to
be made --, ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``), a full disk, a read-only file
system or a quota (:data:`ENVIRONMENT_ERRNOS`), ``SystemExit`` with a message (``raise SystemExit("error: ...")``), or any type a
command adds with ``expected=``; anything else is a bug and keeps its traceback. ``CLI_TRACEBACK=1`` in
the environment shows the traceback of a mistake too. It lives in the core because every package may
import the core, and nothing else: it needs only the standard library.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from typing import Callable

USAGE_EXIT = 2  # argparse's status for a bad option; the same for every other mistake


def traceback_wanted() -> bool:
    """``CLI_TRACEBACK`` is set (not empty, not 0): a mistake keeps its traceback."""
    return os.environ.get("CLI_TRACEBACK", "") not in ("", "0")


class UsageError(Exception):
    """A mistake the user can fix; the message says what to do."""


MISTAKES = (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# OSErrors of the machine, not of the code: a full disk, a read-only file system, a quota (the writes are atomic:
# nothing good was lost, the user frees space or picks another folder)
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def positive_int(text: str) -> int:
    """An argparse ``type=``: an integer of at least 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, not {text!r}")
    return value


def one_line(error: BaseException | str) -> str:
    """``error: <message>`` on one line; an ``OSError`` without a message of ours reads ``PATH: reason``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror and \
            str(error).startswith(f"[Errno {error.errno}]"):
        text = f"{error.filename}: {error.strerror[0].lower()}{error.strerror[1:]}"
    else:
        text = str(error)
    if "\nOriginal Traceback (most recent call last):" in text:  # re-raised from a DataLoader worker: its message
        last = [line for line in text.splitlines() if line.strip()][-1]  # "pkg.module.ImageError: path: reason"
        text = re.sub(r"^[A-Za-z_][\w.]*: ", "", last.strip(), count=1)
    text = " ".join(text.split()) or type(error).__name__
    return text if text.startswith("error: ") else f"error: {text}"


def run(main: Callable[..., int | None], *args, expected: tuple[type[BaseException], ...] = ()) -> int:
    """``main(*args)``'s exit status; a mistake (see the module docstring) is printed as one line and is 2."""
    try:
        return int(main(*args) or 0)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(one_line(str(e.code)), file=sys.stderr)
        return USAGE_EXIT
    except (MISTAKES + tuple(expected) + (OSError,)) as e:
        if isinstance(e, OSError) and not isinstance(e, MISTAKES + tuple(expected)) \
                and e.errno not in ENVIRONMENT_ERRNOS:
            raise  # any other OSError is a bug: its traceback
        if traceback_wanted():
            raise
        print(one_line(e), file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
