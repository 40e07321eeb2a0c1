"""A bound on the memory that the image decodes running at once in one worker hold.

Admission (``inference.admission``) counts decoded *pixels*; what a decode holds at its peak depends on
the format too: Pillow's working copies, a decoder's own buffers (libwebp keeps two RGBA canvases), the
RGB conversion and the tensor. :func:`decode_bytes` estimates it from the header (:class:`ImageInfo`)
with the bytes per decoded pixel measured for each format (:data:`BYTES_PER_PIXEL`: peak RSS over
``inference.images.decode_rgb`` + the evaluation transform of one 6000x6000 image, 2026-12-07,
``docs/reliability.md``). :class:`DecodeMemory` lets a decode start only while the estimates of those
running stay within ``max_decode_bytes`` (one larger than the whole budget runs alone), so that a pool
of N threads never holds N full-size images: with 16 threads, 16 WEBPs of 39 MP would otherwise take
about 10 GB at once. The handler's decode pool waits on it; offline commands decode one image at a time.
"""
from __future__ import annotations

import contextlib
import threading

from inference.images import ImageInfo
from inference.jpeg import JPEG_FORMATS

DEFAULT_MAX_DECODE_BYTES = 1 << 30  # per worker: one 39 MP WEBP (0.7 GB), two 39 MP PNGs, any JPEG photos
# peak bytes per decoded pixel, measured (see the module docstring), rounded up: Pillow's image, its bytes and
# the tensor (10; the same for RGB, RGBA, palette and 16-bit PNG, GIF, TIFF, BMP), libwebp's two RGBA canvases
# on top (18), libjpeg-turbo straight into the tensor (3.3 at full size; a progressive JPEG, counted at full
# size, holds its coefficients: 3.1)
BYTES_PER_PIXEL = {"JPEG": 4, "MPO": 4, "PNG": 10, "WEBP": 18, "GIF": 10, "TIFF": 10, "BMP": 10}


def decode_bytes(info: ImageInfo, min_side: int | None = None) -> int:
    """What decoding ``info``'s image (to ``min_side``, as :meth:`ImageInfo.decoded_pixels`) holds at its peak."""
    pixels = info.decoded_pixels(min_side) if info.format in JPEG_FORMATS else info.pixels  # RLE BMP: no time weight
    return pixels * BYTES_PER_PIXEL.get(info.format, max(BYTES_PER_PIXEL.values()))


class DecodeMemory:
    """``with memory.hold(n):`` waits until ``n`` more bytes fit within ``limit`` next to the decodes
    holding memory now (or until none is, for one larger than ``limit``), and holds them until the block
    ends. Thread-safe; the waits are in the order the condition wakes them."""

    cost = staticmethod(decode_bytes)  # what ``inference.images.decode_many`` holds for an image

    def __init__(self, limit: int = DEFAULT_MAX_DECODE_BYTES):
        self.limit, self.held, self.peak = limit, 0, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        with self._cond:
            self._cond.wait_for(lambda: self.held == 0 or self.held + n <= self.limit)
            self.held += n
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._cond:
                self.held -= n
                self._cond.notify_all()
