"""Progress bars for the long loops of training (epochs, decoding, statistics, evaluation).

:func:`tqdm` is ``tqdm.tqdm`` on a terminal. When its stream is not a terminal (CI, ``make demo``
piped to a file, a Kubernetes job's log) a bar redrawn with carriage returns would fill the log with
one unreadable line: there it prints plain lines instead, one every ``PLAIN_INTERVAL_S`` seconds
(and the last one), each ending with a newline.
"""
from __future__ import annotations

import io
import sys

from tqdm import tqdm as _tqdm

PLAIN_INTERVAL_S = 30.0


class _PlainLines(io.TextIOBase):
    """A stream for tqdm that turns each redraw (``\\r`` + status) into one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _PlainBar(_tqdm):
    """tqdm whose ``set_postfix``/``set_description`` wait for the next interval instead of redrawing
    at once (tqdm's default ``refresh=True`` would print one plain line per training step)."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_description(self, desc=None, refresh=False):
        super().set_description(desc, refresh=refresh)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def tqdm(iterable=None, *, file=None, mininterval: float = 1.0, **kwargs):
    """``tqdm.tqdm(iterable, ...)``, or plain periodic lines when ``file`` (default stderr) is not a terminal."""
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        return _tqdm(iterable, file=stream, mininterval=mininterval, **kwargs)
    return _PlainBar(iterable, file=_PlainLines(stream), mininterval=max(mininterval, PLAIN_INTERVAL_S), ascii=True,
                 ncols=100, **kwargs)
