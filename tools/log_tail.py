"""Following a log file that log4j2 rolls over: the complete lines appended since a point, across rollovers.

TorchServe's logs are log4j2 ``RollingFile`` appenders: daily and at 100 MB, the file is renamed to its
``filePattern`` and a new one is started (TorchServe's own pattern also gzips the renamed file).
``tools.drain`` counts the answers in ``access_log.log`` from the size it had when the server started; a
server that ran past midnight, or past 100 MB of access log (some 800,000 requests), then found fewer answers
than arrivals and waited out its whole timeout. ``tools.torchserve.log_config`` therefore rolls the access
log and ``ts_log.log`` into plain files (:data:`ROLLED_PATTERN`), which keep the inode the file had while it
was written: :class:`LogTail` remembers the inode with its position, and when the file at ``path`` is another
one it reads the rest of the renamed file (found by that inode), then every file rolled after it (by
modification time), then the new file from its start. Where the renamed file cannot be found (compressed,
deleted by the rollover's ``max``, a log4j2.xml of the user's) it reads the new file from its start and sets
:attr:`LogTail.lost`: lines may be missing, and a count built on them is a lower bound.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

ROLLED_PATTERN = "%d{yyyy-MM-dd}.%i.log"  # after "NAME.": daily, then by size; no ".gz", so the inode stays
ROLLED_MAX = 20  # rolled files a day that log4j2 keeps (TorchServe's 5: a deleted one's lines are lost)
CHUNK = 1 << 20  # bytes read at a time
ROLLED_NAME = re.compile(r"\.(\d{4}-\d\d-\d\d)\.(\d+)\.log$")  # the date and index ROLLED_PATTERN writes


def inode(path: str | os.PathLike) -> int | None:
    """The inode of ``path``, or None when there is no such file."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class LogTail:
    """The complete lines appended to ``path`` from byte ``offset`` of the file whose inode is ``inode`` (None:
    whatever file is at ``path`` on the first read) on; a half-written last line waits for the next read.
    Files are read :data:`CHUNK` bytes at a time, so a drain that meets a rolled 100 MB log holds one chunk."""

    def __init__(self, path: str | os.PathLike, offset: int = 0, inode: int | None = None):
        self.path, self.pos, self.inode = Path(path), int(offset), inode
        self.lost = False
        self._partial = b""

    def lines(self) -> Iterator[str]:
        """The lines appended since the last call (none while there is no file); consume it whole: the
        position moves on as chunks are read."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            st = os.fstat(f.fileno())
            if self.inode is not None and st.st_ino != self.inode:  # rolled over since the last read
                for k, rolled in enumerate(self._rolled_after()):
                    with open(rolled, "rb") as g:
                        g.seek(self.pos if k == 0 else 0)
                        yield from self._chunks(g)
                self.pos = 0
            elif st.st_size < self.pos:  # rolled over (or truncated), and the earlier file is not known
                self.lost, self.pos = True, 0
            self.inode = st.st_ino
            f.seek(self.pos)
            for line in self._chunks(f):
                self.pos = f.tell()
                yield line
            self.pos = f.tell()

    def _chunks(self, f) -> Iterator[str]:
        """The complete lines of ``f`` from where it stands to its end, the last partial one kept back."""
        while chunk := f.read(CHUNK):
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            yield from (line.decode(errors="replace") for line in lines)

    def _rolled_after(self) -> list[Path]:
        """The rolled file that was being read (from :attr:`pos`), then the files rolled after it."""
        rolled = []
        for p in self.path.parent.glob(f"{self.path.stem}.*"):
            try:
                st = p.stat()
            except OSError:
                continue
            if p != self.path and p.is_file():
                m = ROLLED_NAME.search(p.name)  # ties of the coarse file clock: the name's date and index decide
                rolled.append(((st.st_mtime_ns, m[1], int(m[2])) if m else (st.st_mtime_ns, "", 0), st.st_ino, p))
        rolled.sort(key=lambda r: r[0])
        start = next((i for i, (_, ino, _) in enumerate(rolled) if ino == self.inode), None)
        if start is None:
            self.lost, self.pos = True, 0
            return []
        out = []
        for k, (_, _, p) in enumerate(rolled[start:]):
            if p.suffix == ".gz":  # a later roll compressed: its lines are not read
                self.lost = True
                if k == 0:
                    self.pos = 0
            else:
                out.append(p)
        return out
