"""The container structure of an image file, walked before Pillow opens it: a bound on its segments.

Pillow reads the headers of JPEG, PNG, GIF and TIFF files in Python, one marker, chunk, block or tag at a
time, at 1-4 µs each. A file made of nothing but such units (empty 12-byte PNG chunks, 4-byte JPEG COM
markers, 2-byte GIF sub-blocks, 12-byte TIFF tags) took 0.25-0.65 s of CPU per MiB to open, where a real
photo of that size takes milliseconds: one 4 MiB PNG of empty chunks held a worker for 2.6 s (read once to
probe, once to decode), a 16 MiB request (``max_request_size``) of them about 10 s. :func:`check_structure`
walks the same structure looking at a few bytes per unit and refuses a file with more units than real
images have, with a message that names the count:

* JPEG: markers, fill bytes and stray bytes between segments (Pillow steps over those one at a time) before
  the first scan: at most ``MAX_HEADER_UNITS`` (a phone photo has 10-30; an ICC profile or extended XMP
  split over 64 KiB segments adds a few dozen).
* PNG: chunks other than the image data's (``IDAT``, and ``fcTL``/``fdAT`` of animation frames): at most
  ``MAX_HEADER_UNITS``; chunks in all: at most :func:`unit_limit` of the file's size (libpng writes its
  image data in 8 KiB chunks, Pillow in 64 KiB ones) plus ``FRAME_UNITS`` an animation frame.
* GIF: blocks and data sub-blocks of the frames that ``images.probe`` reads (``max_frames + 1``): at most
  :func:`unit_limit` plus ``FRAME_UNITS`` a frame (encoders write 255-byte sub-blocks; a tiny frame
  and its control block are 6 blocks), stray bytes between blocks counted one by one as Pillow reads them.
* TIFF (and BigTIFF): tags of one page at most ``MAX_HEADER_UNITS``; strips or tiles of a page no more than
  its size needs (a 64x64 page listing a million strips cost 9.7 s: Pillow decodes the extra ones as
  further layers); tags, pages, strips and tiles of the pages that ``images.probe`` reads
  (``max_frames + 1``) at most ``MAX_TIFF_UNITS`` (a 7200x5500 RGB photo in libtiff's 8 KiB strips has 5,500).

The walk stops where the structure cannot be followed (cut off, corrupt, another format): Pillow then says
what is wrong. WEBP (read by libwebp), BMP (one fixed header) and MPO's index (bounded by its segment) need
no walk.
"""
from __future__ import annotations

import re
from struct import error as StructError
from struct import unpack_from

from inference.image_errors import ImageError

MAX_HEADER_UNITS = 1024   # JPEG markers before the scan, PNG chunks that are not image data, TIFF tags of a page
MAX_TIFF_UNITS = 65_536   # tags, pages, strips and tiles of the TIFF pages read (1,000 pages of 20 tags: 21,000)
TIFF_PIECES = (273, 324)  # StripOffsets, TileOffsets: Pillow makes a tile of each value in Python, and decodes it
# ImageWidth, ImageLength, SamplesPerPixel, RowsPerStrip, PlanarConfiguration, TileWidth, TileLength: the pieces
# a page needs; read when they are one SHORT, LONG or LONG8 (BigTIFF), as every writer stores them
TIFF_GEOMETRY, TIFF_INTEGERS = (256, 257, 277, 278, 284, 322, 323), {3: "H", 4: "I", 16: "Q"}
FRAME_UNITS = 8            # the blocks or chunks a frame may add beyond its size's share (a 16x16 GIF frame: 6)
PNG_DATA_CHUNKS = (b"IDAT", b"fcTL", b"fdAT")
GIF_BLOCK = re.compile(rb"[;!,]")  # what starts a GIF block: Pillow skips any other byte
PNG_MAGIC, GIF_MAGICS = b"\x89PNG\r\n\x1a\n", (b"GIF87a", b"GIF89a")
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class StructureError(ImageError):
    """More segments than any real image has: a 400 that names the count."""


def unit_limit(size: int) -> int:
    """PNG chunks or GIF blocks in a file of ``size`` bytes: 4,096 plus one per 128 bytes, twice what
    the smallest data segments that encoders write (255-byte GIF sub-blocks) need."""
    return 4096 + size // 128


def check_structure(data: bytes | bytearray, *, max_frames: int) -> None:
    """Raise :class:`StructureError` when ``data`` has more markers, chunks, blocks or tags than the bounds
    of the module docstring; return silently otherwise (other formats, or a structure the walk cannot follow)."""
    head = bytes(data[:8])
    try:
        if head[:3] == b"\xff\xd8\xff":
            _jpeg(data)
        elif head == PNG_MAGIC:
            _png(data, max_frames=max_frames + 1)
        elif head[:6] in GIF_MAGICS:
            _gif(data, max_frames=max_frames + 1)
        elif head[:4] in TIFF_MAGICS:
            _tiff(data, max_pages=max_frames + 1)
    except (IndexError, StructError):  # cut off in the middle of a unit
        return


def _refuse(kind: str, what: str, limit: int, size: int) -> None:
    raise StructureError(f"{kind} of {size} bytes with more than {limit} {what}: refused (real images have "
                         "far fewer; reading them would hold the worker)")


def _jpeg(data) -> None:
    i, units, size = 2, 0, len(data)
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
        if marker in (0xDA, 0xD9):  # the first scan (SOS), or the end (EOI)
            return
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # an escaped 0xFF; markers without a length
            i += 2
        else:
            i += 2 + unpack_from(">H", data, i + 2)[0]
    if units > MAX_HEADER_UNITS:
        _refuse("JPEG", "markers and stray bytes before its image data", MAX_HEADER_UNITS, size)


def _png(data, *, max_frames: int) -> None:
    i, chunks, headers, limit = 8, 0, 0, unit_limit(len(data))
    while True:
        length, kind = unpack_from(">I4s", data, i)
        chunks += 1
        if kind == b"fcTL" and max_frames > 0:  # an animation frame, as many as images.probe allows; the walk
            max_frames, limit = max_frames - 1, limit + FRAME_UNITS  # goes on: Pillow reads the rest of a still PNG
        headers += kind not in PNG_DATA_CHUNKS
        if headers > MAX_HEADER_UNITS:
            _refuse("PNG", "chunks besides its image data", MAX_HEADER_UNITS, len(data))
        if chunks > limit:
            _refuse("PNG", "chunks", limit, len(data))
        if kind == b"IEND":
            return
        i += 12 + length


def _gif(data, *, max_frames: int) -> None:
    flags = data[10]
    i, units, limit = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0), 0, unit_limit(len(data))
    while data[i] != 0x3B:  # the trailer
        if data[i] == 0x21:  # an extension: introducer and label, then its sub-blocks
            i += 2
        elif data[i] == 0x2C:  # an image: descriptor, local colour table, LZW code size, then its sub-blocks
            if max_frames <= 0:  # as far as images.probe counts frames (it refuses more)
                return
            max_frames, limit = max_frames - 1, limit + FRAME_UNITS
            flags = data[i + 9]
            i += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        else:  # bytes between blocks: Pillow steps over them one at a time, so they count
            block = GIF_BLOCK.search(data, i)
            units += (block.start() if block else len(data)) - i
            if units > limit:
                _refuse("GIF", "blocks, sub-blocks and stray bytes", limit, len(data))
            if not block:
                return
            i = block.start()
            continue
        units += 1
        while True:
            size = data[i]
            i += 1 + size
            units += 1
            if units > limit:
                _refuse("GIF", "blocks, sub-blocks and stray bytes", limit, len(data))
            if not size:
                break


def _tiff(data, *, max_pages: int) -> None:
    order = "<" if data[0] == 0x49 else ">"
    big = data[2 if order == "<" else 3] == 0x2B
    count_fmt, offset_fmt, entry = (order + "Q", order + "Q", 20) if big else (order + "H", order + "I", 12)
    entry_fmt, width = (order + "HHQ", 8) if big else (order + "HHI", 2)  # an entry: tag, type, count of values
    offset = unpack_from(offset_fmt, data, 8 if big else 4)[0]
    seen, units = set(), 0
    while offset and offset not in seen and len(seen) < max_pages:
        seen.add(offset)
        tags = unpack_from(count_fmt, data, offset)[0]
        if tags > MAX_HEADER_UNITS:
            _refuse("TIFF", "tags in one page", MAX_HEADER_UNITS, len(data))
        page, pieces = {}, 0
        for k in range(tags):
            at = offset + width + k * entry
            tag, kind, values = unpack_from(entry_fmt, data, at)
            if tag in TIFF_PIECES:
                pieces += values
            elif tag in TIFF_GEOMETRY and values == 1 and kind in TIFF_INTEGERS:
                page[tag] = unpack_from(order + TIFF_INTEGERS[kind], data, at + (12 if big else 8))[0]
        if pieces > _tiff_pieces(page):  # Pillow wraps the extra ones into layers and decodes every one
            raise StructureError(f"TIFF of {len(data)} bytes listing {pieces} strips or tiles where its "
                                 f"{page.get(256, 1)}x{page.get(257, 1)} page needs {_tiff_pieces(page)}: refused")
        units += tags + 1 + pieces
        if units > MAX_TIFF_UNITS:
            _refuse("TIFF", "tags, pages, strips and tiles", MAX_TIFF_UNITS, len(data))
        offset = unpack_from(offset_fmt, data, offset + width + tags * entry)[0]


def _tiff_pieces(page: dict[int, int]) -> int:
    """The strips or tiles a page's geometry needs: planes x (tiles across x down, or strips down)."""
    columns, rows = page.get(256, 1), page.get(257, 1)
    planes = page.get(277, 1) if page.get(284, 1) == 2 else 1
    if 322 in page and 323 in page:  # tiled
        return planes * -(-columns // max(page[322], 1)) * -(-rows // max(page[323], 1))
    return planes * -(-rows // max(min(page.get(278, rows), rows), 1))
