"""The directories (IFDs) of a TIFF file, walked before Pillow opens it: a bound on what Pillow reads in Python.

Pillow reads a TIFF page's tags one by one in Python (about 4 µs each), makes a Python object of every
fraction of a RATIONAL tag it reads (a page whose XResolution held 450,000 fractions cost 2.7 s), reads the
EXIF and GPS directories of an uncompressed page when it loads it, and cuts an uncompressed page into a
tile per strip or tile listed, each set up in Python and decoded (a 64x64 page listing a million strips
cost 9.7 s: the extra strips are decoded as further layers). :func:`check_tiff` reads the same directories,
a few bytes per tag, as Pillow does (the first of duplicate tags counts; strips when ``StripOffsets`` is
there, else tiles), and refuses with a 400 that names the count:

* a directory of more than ``MAX_TAGS`` tags or ``MAX_FRACTIONS`` fractions (a camera's EXIF has a few
  dozen of each);
* more than ``MAX_TIFF_TAGS`` tags plus one per 64 bytes of the file in all, over the pages that
  ``images.probe`` reads (``max_frames + 1``) and their EXIF, GPS and Interoperability directories (a
  950-page fax of 1.5 MB: 8,550); a colour map of more than ``MAX_COLOURS`` values;
* an uncompressed page listing more strips or tiles than its size needs, or more than ``MAX_PAGE_PIECES``
  (a 40 MP photo in one-row strips has at most 28,284), and more than 4,096 plus one per 16 bytes of the
  file over the pages read. Compressed pages are cut by libtiff, in C: their strips cost no Python.
"""
from __future__ import annotations

from struct import unpack_from

from inference.image_errors import StructureError

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_TAGS = 1024            # tags of one directory
MAX_FRACTIONS = 1024       # values of RATIONAL and SRATIONAL tags in one directory
MAX_TIFF_TAGS = 8192       # tags of every directory read, plus one per 64 bytes of the file
MAX_COLOURS = 3 * 256      # ColorMap values: Pillow reads TIFF palettes of 8 bits at most, each value in Python
MAX_PAGE_PIECES = 32_768   # strips or tiles of one uncompressed page
SUB_DIRECTORIES = (34665, 34853, 40965)  # EXIF, GPS, Interoperability (inside EXIF)
FRACTIONS = (5, 10)
INTEGERS = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}  # SHORT, LONG, IFD, LONG8, IFD8: a size, an offset
# ImageWidth, ImageLength, Compression, SamplesPerPixel, RowsPerStrip, StripOffsets, PlanarConfiguration,
# TileWidth, TileLength, TileOffsets, ColorMap
WIDTH, LENGTH, COMPRESSION, SAMPLES, ROWS, STRIPS, PLANAR, TILE_WIDTH, TILE_LENGTH, TILES, COLORMAP = (
    256, 257, 259, 277, 278, 273, 284, 322, 323, 324, 320)


class _Layout:
    """Where a classic or a BigTIFF file keeps a directory's count, entries and next-directory offset."""

    def __init__(self, data) -> None:
        self.order = order = "<" if data[0] == 0x49 else ">"
        self.big = data[2 if order == "<" else 3] == 0x2B
        self.count, self.entry, self.offset = (order + "Q", order + "HHQ", order + "Q") if self.big else (
            order + "H", order + "HHI", order + "I")
        self.count_size, self.entry_size, self.value_at = (8, 20, 12) if self.big else (2, 12, 8)


def check_tiff(data, *, max_pages: int) -> None:
    """Raise :class:`StructureError` past the bounds of the module docstring (``IndexError``, ``struct.error``
    or ``OverflowError`` where the structure is cut off or points past any file: the caller stops there)."""
    layout, size = _Layout(data), len(data)
    offset = unpack_from(layout.offset, data, 8 if layout.big else 4)[0]
    seen: set[int] = set()
    tags = pieces = pages = 0
    while offset and offset not in seen and pages < max_pages:
        pages += 1
        entries, count, offset_next = _directory(data, offset, layout, seen)
        tags += count
        for tag in SUB_DIRECTORIES[:2]:  # EXIF (with its Interoperability directory) and GPS
            for sub in _sub_directories(data, entries, tag, layout, seen):
                tags += sub
        if tags > MAX_TIFF_TAGS + size // 64:
            raise StructureError.too_many("TIFF", "tags in its pages and their EXIF", MAX_TIFF_TAGS + size // 64, size)
        pieces += _page_pieces(data, entries, layout)
        if pieces > 4096 + size // 16:
            raise StructureError.too_many("TIFF", "strips and tiles in its pages", 4096 + size // 16, size)
        offset = offset_next


def _directory(data, offset: int, layout: _Layout, seen: set[int]) -> tuple[dict, int, int]:
    """One directory: ``{tag: (type, count, where its value is)}`` (the first of duplicates, as Pillow keeps),
    its number of tags, and the next directory's offset."""
    seen.add(offset)
    count = unpack_from(layout.count, data, offset)[0]
    if count > MAX_TAGS:
        raise StructureError.too_many("TIFF", "tags in one directory", MAX_TAGS, len(data))
    entries, fractions, first = {}, 0, offset + layout.count_size
    for k in range(count):
        at = first + k * layout.entry_size
        tag, kind, values = unpack_from(layout.entry, data, at)
        if tag not in entries:
            entries[tag] = (kind, values, at + layout.value_at)
            fractions += values if kind in FRACTIONS else 0
    if entries.get(COLORMAP, (0, 0))[1] > MAX_COLOURS:
        raise StructureError.too_many("TIFF", "colour map values", MAX_COLOURS, len(data))
    if fractions > MAX_FRACTIONS:
        raise StructureError.too_many("TIFF", "fractions in one directory", MAX_FRACTIONS, len(data))
    return entries, count, unpack_from(layout.offset, data, first + count * layout.entry_size)[0]


def _value(data, entries: dict, tag: int, layout: _Layout, default: int | None = None) -> int | None:
    """A tag's single integer value, as writers store sizes and offsets; ``default`` when absent or otherwise."""
    kind, values, at = entries.get(tag, (None, 0, 0))
    if values != 1 or kind not in INTEGERS:
        return default
    return unpack_from(layout.order + INTEGERS[kind], data, at)[0]


def _sub_directories(data, entries: dict, tag: int, layout: _Layout, seen: set[int]):
    """The tag counts of the EXIF or GPS directory ``tag`` points to, and of the Interoperability one inside EXIF."""
    offset = _value(data, entries, tag, layout)
    if offset and offset not in seen:
        sub, count, _ = _directory(data, offset, layout, seen)
        yield count
        if tag == SUB_DIRECTORIES[0]:
            yield from _sub_directories(data, sub, SUB_DIRECTORIES[2], layout, seen)


def _page_pieces(data, entries: dict, layout: _Layout) -> int:
    """The strips or tiles of an uncompressed page that Pillow sets up in Python (0 for a compressed one),
    refused past what the page's size needs or ``MAX_PAGE_PIECES``."""
    if _value(data, entries, COMPRESSION, layout, 1) != 1 or not {STRIPS, TILES} & entries.keys():
        return 0
    columns, rows = _value(data, entries, WIDTH, layout, 1), _value(data, entries, LENGTH, layout, 1)
    planes = _value(data, entries, SAMPLES, layout, 1) if _value(data, entries, PLANAR, layout, 1) == 2 else 1
    if STRIPS in entries:
        listed = entries[STRIPS][1]
        needed = -(-rows // max(min(_value(data, entries, ROWS, layout, rows), rows), 1))
    else:
        listed = entries[TILES][1]
        width, length = _value(data, entries, TILE_WIDTH, layout, 0), _value(data, entries, TILE_LENGTH, layout, 0)
        if not (width and length):  # Pillow refuses tiles of no size
            return 0
        needed = -(-columns // width) * -(-rows // length)
    needed *= planes
    if listed > needed:  # Pillow wraps the extra ones into layers and decodes every one
        raise StructureError(f"TIFF of {len(data)} bytes listing {listed} strips or tiles where its {columns}x{rows} "
                             f"page needs {needed}: refused")
    if listed > MAX_PAGE_PIECES:
        raise StructureError.too_many("TIFF", "strips or tiles in one page", MAX_PAGE_PIECES, len(data))
    return listed
