"""The container structure of a JPEG, PNG or GIF file, walked before Pillow opens it: a bound on its segments.

Pillow reads these headers in Python, one marker, chunk or block at a time, at 1-4 µs each, and some
segments cost it far more than their bytes (a component list, an ICC profile to inflate). A file made of
nothing but such units (empty 12-byte PNG chunks, 4-byte JPEG COM markers, 2-byte GIF sub-blocks) took
0.25-0.65 s of CPU per MiB to open, where a real photo of that size takes milliseconds: one 4 MiB PNG of
empty chunks held a worker for 2.6 s (read once to probe, once to decode), a 16 MiB request
(``max_request_size``) of them about 10 s. :func:`check_structure` walks the structure as Pillow does,
a few bytes looked at per unit, and refuses a file with more units than real images have (a 400 that names
the count):

* JPEG, before the first scan: markers, fill bytes, and stray bytes between segments (Pillow steps over those
  one at a time; its markers without a length, EOI among them, do not end its walk), plus a unit per
  component a frame header lists: at most ``MAX_HEADER_UNITS`` (a phone photo has 10-30; an ICC profile or
  extended XMP split over 64 KiB segments adds a few dozen). EXIF (Pillow joins every ``Exif`` APP1 segment
  and reads its resolution, fraction by fraction): at most ``MAX_EXIF_BYTES``, two full segments.
* PNG: chunks other than the image data's (``IDAT``, and ``fcTL``/``fdAT`` of animation frames): at most
  ``MAX_HEADER_UNITS``, of which ``MAX_COMPRESSED_CHUNKS`` that Pillow inflates (``iCCP``, ``zTXt``,
  ``iTXt``: up to 1 MiB each from 1 KiB); chunks in all: at most :func:`unit_limit` of the file's size
  (libpng writes its image data in 8 KiB chunks, Pillow in 64 KiB ones) plus ``FRAME_UNITS`` a frame.
* GIF: blocks, data sub-blocks and stray bytes between blocks, read as Pillow reads them, of the frames
  that ``images.probe`` reads (``max_frames + 1``): at most :func:`unit_limit` plus ``FRAME_UNITS`` a frame
  (encoders write 255-byte sub-blocks; a tiny frame and its control block are 6 blocks).
* TIFF (and BigTIFF): its directories, by :mod:`inference.tiff_ifds`.

The walk stops where the structure cannot be followed (cut off, corrupt, another format): Pillow then says
what is wrong. WEBP (read by libwebp), BMP (one fixed header) and MPO's index (bounded by its segment) need
no walk; their EXIF is read lazily, one tag (the orientation), never rewritten (``images``).
"""
from __future__ import annotations

import re
from struct import error as StructError
from struct import unpack_from

from inference.image_errors import StructureError
from inference.tiff_ifds import TIFF_MAGICS, check_tiff

MAX_HEADER_UNITS = 1024   # JPEG markers before the scan, PNG chunks that are not image data
MAX_COMPRESSED_CHUNKS = 32  # PNG chunks that Pillow inflates, each up to 1 MiB (a real PNG has one iCCP, a few text)
MAX_EXIF_BYTES = 2 * 65_527  # JPEG EXIF in all: two full APP1 segments (the standard fits it in one)
FRAME_UNITS = 8            # the blocks or chunks a frame may add beyond its size's share (a 16x16 GIF frame: 6)
JPEG_NO_LENGTH = {0x00, 0x01, 0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)}  # 00: an escaped 0xFF; 01: TEM
JPEG_FRAMES = {*range(0xC0, 0xD0), 0xDE} - {0xC4, 0xC8, 0xCC}  # SOF0-15 and DHP: a component list each
JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker in entropy-coded data
MAX_SCANS = 32             # a progressive JPEG's scans (libjpeg's own scripts write 10; mozjpeg's about as many)
PNG_DATA_CHUNKS = (b"IDAT", b"fcTL", b"fdAT")
PNG_INFLATED = (b"iCCP", b"zTXt", b"iTXt")
GIF_BLOCK = re.compile(rb"[;!,]")  # what starts a GIF block: Pillow skips any other byte
PNG_MAGIC, GIF_MAGICS, NETSCAPE = b"\x89PNG\r\n\x1a\n", (b"GIF87a", b"GIF89a"), b"NETSCAPE2.0"

__all__ = ["StructureError", "check_structure", "unit_limit"]


def unit_limit(size: int, *, per: int = 128) -> int:
    """PNG chunks or GIF blocks in a file of ``size`` bytes: 4,096 plus one per 128 bytes (GIF: 64), twice what
    the smallest data segments that encoders write (255-byte GIF sub-blocks) need."""
    return 4096 + size // per


def check_structure(data: bytes | bytearray, *, max_frames: int) -> int:
    """Raise :class:`StructureError` when ``data`` has more markers, chunks, blocks or tags than the bounds
    of the module docstring; else return a JPEG's number of scans (libjpeg holds the coefficients of a JPEG of
    several at full size), 0 for other formats or a structure the walk cannot follow."""
    head = bytes(data[:8])
    try:
        if head[:3] == b"\xff\xd8\xff":
            return _jpeg(data)
        elif head == PNG_MAGIC:
            _png(data, max_frames=max_frames + 1)
        elif head[:6] in GIF_MAGICS:
            _gif(data, max_frames=max_frames + 1)
        elif head[:4] in TIFF_MAGICS:
            check_tiff(data, max_pages=max_frames + 1)
        elif head[:4] == b"RIFF" and bytes(data[8:12]) == b"WEBP":
            _webp(data)
    except (IndexError, StructError, OverflowError):  # cut off in the middle of a unit, or an offset past any file
        pass
    return 0


def _jpeg(data) -> int:
    i, units, exif, size, progressive, components = 2, 0, 0, len(data), False, 1
    while units <= MAX_HEADER_UNITS:
        if data[i] != 0xFF:  # bytes between segments: Pillow steps over them one at a time, so they count
            j = data.find(b"\xff", i)
            units += (size if j < 0 else j) - i
            if j < 0:
                break
            i = j
            continue
        marker = data[i + 1]
        units += 1
        if marker == 0xDA:  # the first scan: libjpeg reads the rest, in C, and goes over every block of a
            # component in each scan (1,000 empty scans of 4096x4096: 2.2 s): a sequential or lossless JPEG
            # has a scan per component at most, a progressive one MAX_SCANS
            return _scans(data, i, MAX_SCANS if progressive else components, units)
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker in JPEG_NO_LENGTH:
            i += 2
        elif marker < 0xC0:  # no marker Pillow knows: it stops with an error
            return
        else:
            length = unpack_from(">H", data, i + 2)[0]
            if marker in JPEG_FRAMES:  # Pillow reads each component in Python (a real frame has 1, 3 or 4)
                units += max(length - 8, 0) // 3
                progressive, components = progressive or marker in JPEG_PROGRESSIVE, max(data[i + 9], 1)
            if marker == 0xE2 and data[i + 4:i + 8] == b"MPF\x00":  # a multi-picture index: TIFF-structured
                _exif(bytes(data[i + 8:i + 2 + length]), "JPEG's multi-picture index", size)
            if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
                exif += length - 8
                if exif > MAX_EXIF_BYTES:
                    raise StructureError(f"JPEG of {size} bytes whose EXIF segments hold more than {MAX_EXIF_BYTES} "
                                         "bytes: refused (EXIF fits one 64 KiB segment)")
            i += 2 + length
    if units > MAX_HEADER_UNITS:
        raise StructureError.too_many("JPEG", "markers and stray bytes before its image data", MAX_HEADER_UNITS,
                                      size)
    return 0


def _scans(data, i: int, limit: int, units: int) -> int:
    """Count the scans of a JPEG from its first, at ``i``, up to its end (EOI: an MPO's next picture follows):
    markers found at C speed past the entropy-coded bytes (0xFF 0x00 is a stuffed byte, 0xFF 0xD0-D7 a
    restart), at most ``MAX_HEADER_UNITS`` in all with the ``units`` before the first scan."""
    scans, size = 0, len(data)
    while True:
        marker, units = data[i + 1], units + 1
        if units > MAX_HEADER_UNITS:
            raise StructureError.too_many("JPEG", "markers", MAX_HEADER_UNITS, size)
        if marker == 0xDA:
            scans += 1
            if scans > limit:
                what = "scans (progressive)" if limit == MAX_SCANS else "scans (one a component)"
                raise StructureError.too_many("JPEG", what, limit, size)
        if marker == 0xD9:
            return scans
        i += 2 if marker in JPEG_NO_LENGTH else 2 + unpack_from(">H", data, i + 2)[0]  # a header, a table
        found = JPEG_MARKER.search(data, i)
        if found is None:
            return scans
        i = found.start()


def _exif(block: bytes, where: str, size: int) -> None:
    """An EXIF block (TIFF-structured) read as Pillow reads EXIF, by :func:`inference.tiff_ifds.check_tiff`."""
    if block[:4] in TIFF_MAGICS:
        try:
            check_tiff(block, max_pages=2)  # the first directory and the thumbnail's
        except StructureError as e:
            raise StructureError(f"{where}, in a file of {size} bytes: {e}") from None
        except (IndexError, StructError, OverflowError):
            return


def _png(data, *, max_frames: int) -> None:
    i, chunks, headers, inflated, limit = 8, 0, 0, 0, unit_limit(len(data))
    while True:
        length, kind = unpack_from(">I4s", data, i)
        chunks += 1
        if kind == b"fcTL" and max_frames > 0:  # an animation frame, as many as images.probe allows; the walk
            max_frames, limit = max_frames - 1, limit + FRAME_UNITS  # goes on: Pillow reads the rest of a still PNG
        headers += kind not in PNG_DATA_CHUNKS
        inflated += kind in PNG_INFLATED
        if headers > MAX_HEADER_UNITS:
            raise StructureError.too_many("PNG", "chunks besides its image data", MAX_HEADER_UNITS, len(data))
        if inflated > MAX_COMPRESSED_CHUNKS:
            raise StructureError.too_many("PNG", "compressed profile and text chunks", MAX_COMPRESSED_CHUNKS,
                                          len(data))
        if chunks > limit:
            raise StructureError.too_many("PNG", "chunks", limit, len(data))
        if kind == b"IEND":
            return
        if kind == b"eXIf":
            _exif(bytes(data[i + 8:i + 8 + length]), "PNG's EXIF chunk", len(data))
        i += 12 + length


def _gif(data, *, max_frames: int) -> None:
    flags = data[10]
    i, units, frames = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0), 0, 0
    limit = unit_limit(len(data), per=64)  # XMP in an application extension is read as sub-blocks: ~1 per 80 bytes
    while data[i] != 0x3B:  # the trailer
        if data[i] == 0x21:  # an extension: as Pillow reads it, a first sub-block, then sub-blocks up to an empty one
            label, i, units = data[i + 1], i + 2, units + 1
            first = data[i]
            i, units = i + 1 + first, units + 1
            if label == 0xFE and not first:  # a comment ends at its first empty sub-block; any other extension
                continue                     # goes on to the next empty one, after one more for NETSCAPE2.0
            if label == 0xFF and not frames and bytes(data[i - first:i - first + 11 * (first >= 11)]) == NETSCAPE:
                i, units = i + 1 + data[i], units + 1
        elif data[i] == 0x2C:  # an image: descriptor, local colour table, LZW code size, then its sub-blocks
            if frames >= max_frames:  # as far as images.probe counts frames (it refuses more)
                return
            frames, limit, flags = frames + 1, limit + FRAME_UNITS, data[i + 9]
            i, units = i + 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0), units + 1
        else:  # bytes between blocks: Pillow steps over them one at a time, so they count
            block = GIF_BLOCK.search(data, i)
            units += (block.start() if block else len(data)) - i
            if units > limit:
                raise StructureError.too_many("GIF", "blocks, sub-blocks and stray bytes", limit, len(data))
            if not block:
                return
            i = block.start()
            continue
        while True:
            size = data[i]
            i, units = i + 1 + size, units + 1
            if units > limit:
                raise StructureError.too_many("GIF", "blocks, sub-blocks and stray bytes", limit, len(data))
            if not size:
                break


def _webp(data) -> None:
    """libwebp reads a WEBP in C; Pillow reads its EXIF chunk (after the image data, so every chunk is walked)."""
    i, chunks, limit = 12, 0, unit_limit(len(data))
    while i + 8 <= len(data):
        kind, length = unpack_from("<4sI", data, i)
        chunks += 1
        if chunks > limit:
            raise StructureError.too_many("WEBP", "chunks", limit, len(data))
        if kind == b"EXIF":
            _exif(bytes(data[i + 8:i + 8 + length]).removeprefix(b"Exif\x00\x00"), "WEBP's EXIF chunk",
                  len(data))
        i += 8 + length + (length & 1)
