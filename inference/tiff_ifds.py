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
* more than ``MAX_TIFF_VALUES`` values of types other than bytes (Pillow converts each one in Python, on
  every load of a page: 4 M signed bytes in an XMP tag cost 1 s), or strips and tiles whose byte counts add
  up to more than the file (compressed strips that share bytes: libtiff decodes each from its start);
* more than ``MAX_TIFF_TAGS`` tags plus ``PAGE_TAGS`` a page and one per 256 bytes of the file in all, over
  the pages that ``images.probe`` reads (``max_frames + 1``) and their EXIF, GPS and Interoperability
  directories (a 1,000-page fax of 1.1 MB: 16,000); a colour map of more than ``MAX_COLOURS`` values, or
  more than ``MAX_FEW_VALUES`` in a per-sample tag;
* an uncompressed page listing more strips or tiles than its size needs, or more than ``MAX_PAGE_PIECES``
  (a 40 MP photo in one-row strips has at most 28,284), more than 4,096 plus one per 16 bytes of the file
  over the pages read, or pages whose pixels add up to more bytes than the file has (strips that share
  bytes). Compressed pages are cut by libtiff, in C: their strips cost no Python;
* a tile of more than ``MAX_TILE_PIXELS`` and 4 times its page's pixels, compressed or not (libtiff decodes
  each tile into a buffer of the whole tile: a 64x64 page declaring one 16384x8192 tile, a 400 KB file
  admitted as 4,096 pixels, took 384 MB and 1.1 s), or a tile size stored as another type than an unsigned
  integer (libtiff reads signed ones too; this walk would not see them).

A directory cut off by the end of the file counts with the entries it holds (Pillow keeps them); one the
file cannot hold at all, or an EXIF or GPS pointer past its end, is skipped, as Pillow skips it.
"""
from __future__ import annotations

from dataclasses import dataclass
from struct import error as StructError
from struct import unpack_from

from inference.image_errors import StructureError

TIFF_MAGICS = (b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")  # Pillow's PREFIXES
MAX_TAGS = 1024            # tags of one directory
MAX_FRACTIONS = 1024       # values of RATIONAL and SRATIONAL tags in one directory
MAX_TIFF_TAGS = 8192       # tags of every directory read, plus PAGE_TAGS a page and one per 256 bytes of the file
PAGE_TAGS = 24             # what a page of a real multi-page file has (a fax: 9-16)
MAX_COLOURS = 3 * 256      # ColorMap values: Pillow reads TIFF palettes of 8 bits at most, each value in Python
MAX_PAGE_PIECES = 32_768   # strips or tiles of one uncompressed page
MAX_TILE_PIXELS = 4096 * 4096  # a tile past 4x its page: any power-of-two tiling (GDAL blocks up to 4096) fits
SUB_DIRECTORIES = (34665, 34853, 40965)  # EXIF, GPS, Interoperability (inside EXIF)
FRACTIONS = (5, 10)
INTEGERS = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}  # SHORT, LONG, IFD, LONG8, IFD8: a size, an offset
INTEGER_SIZES = {3: 2, 4: 4, 13: 4, 16: 8, 18: 8}
FEW_VALUES = (258, 338, 339, 530)  # BitsPerSample, ExtraSamples, SampleFormat, YCbCrSubSampling: Pillow converts
MAX_FEW_VALUES = 64                # each value in Python; a sample or two each is what real pages have
BYTES = (1, 2, 7)                  # BYTE, ASCII, UNDEFINED: bytes to Pillow; any other type is converted value by
MAX_TIFF_VALUES = 262_144          # value in Python (0.26 µs each, per load): in all the directories read
# ImageWidth, ImageLength, Compression, SamplesPerPixel, RowsPerStrip, StripOffsets, PlanarConfiguration,
# TileWidth, TileLength, TileOffsets, ColorMap, BitsPerSample
WIDTH, LENGTH, COMPRESSION, SAMPLES, ROWS, STRIPS, PLANAR, TILE_WIDTH, TILE_LENGTH, TILES, COLORMAP, BITS = (
    256, 257, 259, 277, 278, 273, 284, 322, 323, 324, 320, 258)
STRIP_BYTES, TILE_BYTES = 279, 325


@dataclass
class _Directory:
    """One directory as Pillow reads it: ``{tag: (type, count, where its value is)}`` of each tag's first entry,
    each tag's largest count (Pillow skips an entry it cannot read for a later one), the values Pillow converts
    one by one, its number of tags, and the next directory's offset (0 when cut off)."""
    entries: dict[int, tuple[int, int, int]]
    counts: dict[int, int]
    values: int
    tags: int
    following: int


class _Layout:
    """Where a classic or a BigTIFF file keeps a directory's count, entries and next-directory offset, read as
    Pillow reads them: the byte order from the first byte, BigTIFF when the third is 43 (so ``MM\\x00+`` is
    read as a classic file)."""

    def __init__(self, data) -> None:
        self.order = order = "<" if data[0] == 0x49 else ">"
        self.big = data[2] == 0x2B
        self.count, self.entry, self.offset = (order + "Q", order + "HHQ", order + "Q") if self.big else (
            order + "H", order + "HHI", order + "I")
        self.count_size, self.entry_size, self.value_at, self.inline = (8, 20, 12, 8) if self.big else (2, 12, 8, 4)


def check_tiff(data, *, max_pages: int) -> None:
    """Raise :class:`StructureError` past the bounds of the module docstring (``IndexError``, ``struct.error``
    or ``OverflowError`` where the header itself is cut off: the caller stops there)."""
    layout, size = _Layout(data), len(data)
    offset = unpack_from(layout.offset, data, 8 if layout.big else 4)[0]
    pages_seen: set[int] = set()  # Pillow's own loop check: pages only (an EXIF directory may also be a page)
    tags = values = pieces = raw = held = 0
    while offset and offset not in pages_seen and len(pages_seen) < max_pages:
        pages_seen.add(offset)
        page = _directory(data, offset, layout)
        _check_tile_sides(data, page.entries, layout)
        listed, pixel_bytes = _page_pieces(data, page, layout)
        pieces, raw = pieces + listed, raw + pixel_bytes
        if pieces > 4096 + size // 16:
            raise StructureError.too_many("TIFF", "strips and tiles in its pages", 4096 + size // 16, size)
        if raw > size:  # uncompressed pixels are in the file, once: strips that share bytes are decoded each
            raise StructureError(f"TIFF of {size} bytes whose uncompressed pages need {raw} bytes of pixels: refused "
                                 "(strips or tiles overlap)")
        held += _byte_counts(data, page.entries, layout)
        if held > size:  # each strip or tile is decoded from its own bytes: shared ones would be decoded again
            raise StructureError(f"TIFF of {size} bytes whose strips or tiles hold {held} bytes: refused (they "
                                 "overlap)")
        subs = list(_sub_directories(data, page.entries, layout))
        tags += page.tags + sum(d.tags for d in subs)
        if tags > (limit := MAX_TIFF_TAGS + PAGE_TAGS * len(pages_seen) + size // 256):
            raise StructureError.too_many("TIFF", "tags in its pages and their EXIF", limit, size)
        values += page.values + sum(d.values for d in subs)
        if values > MAX_TIFF_VALUES:
            raise StructureError.too_many("TIFF", "values that Pillow converts one by one", MAX_TIFF_VALUES, size)
        offset = page.following


def _directory(data, offset: int, layout: _Layout) -> _Directory:
    """The directory at ``offset``, as much of it as the file holds (Pillow keeps the tags of a cut-off one)."""
    count = unpack_from(layout.count, data, offset)[0]
    if count > MAX_TAGS:
        raise StructureError.too_many("TIFF", "tags in one directory", MAX_TAGS, len(data))
    first = offset + layout.count_size
    held = min(count, max(len(data) - first, 0) // layout.entry_size)
    entries, counts, fractions, converted = {}, {}, 0, 0
    for k in range(held):
        at = first + k * layout.entry_size
        tag, kind, values = unpack_from(layout.entry, data, at)
        fractions += values if kind in FRACTIONS else 0
        converted += values if kind not in BYTES else 0
        entries.setdefault(tag, (kind, values, at + layout.value_at))
        counts[tag] = max(counts.get(tag, 0), values)
    if max((counts.get(tag, 0) for tag in FEW_VALUES), default=0) > MAX_FEW_VALUES:
        raise StructureError.too_many("TIFF", "values in a per-sample tag", MAX_FEW_VALUES, len(data))
    if counts.get(COLORMAP, 0) > MAX_COLOURS:
        raise StructureError.too_many("TIFF", "colour map values", MAX_COLOURS, len(data))
    if fractions > MAX_FRACTIONS:
        raise StructureError.too_many("TIFF", "fractions in one directory", MAX_FRACTIONS, len(data))
    end = first + count * layout.entry_size
    following = unpack_from(layout.offset, data, end)[0] if held == count and end + layout.inline <= len(data) else 0
    return _Directory(entries, counts, converted, count, following)


def _value(data, entries: dict, tag: int, layout: _Layout, default: int | None = None) -> int | None:
    """A tag's first integer value (in line, or where its offset points when larger than the slot, as for a
    LONG8 in a classic file); ``default`` when absent or not an integer."""
    kind, values, at = entries.get(tag, (None, 0, 0))
    if not values or kind not in INTEGERS:
        return default
    if values * INTEGER_SIZES[kind] > layout.inline:
        at = unpack_from(layout.offset, data, at)[0]
    return unpack_from(layout.order + INTEGERS[kind], data, at)[0]


def _sub_directories(data, entries: dict, layout: _Layout):
    """The EXIF, GPS and (inside EXIF) Interoperability directories; one that cannot be read is skipped, as
    Pillow skips it."""
    for tag, inner in ((SUB_DIRECTORIES[0], SUB_DIRECTORIES[2]), (SUB_DIRECTORIES[1], None)):
        directory = entries
        for pointer in (tag, inner):
            try:
                offset = _value(data, directory, pointer, layout, 0) if pointer else 0
                if not offset:
                    break
                found = _directory(data, offset, layout)
            except (IndexError, StructError, OverflowError):
                break
            directory = found.entries
            yield found


def _byte_counts(data, entries: dict, layout: _Layout) -> int:
    """The bytes a page's strips or tiles say they hold (StripByteCounts, else TileByteCounts), summed at C
    speed; 0 when they cannot be read."""
    tag = STRIP_BYTES if STRIP_BYTES in entries else TILE_BYTES
    kind, values, at = entries.get(tag, (None, 0, 0))
    if not values or kind not in INTEGERS:
        return 0
    if values * INTEGER_SIZES[kind] > layout.inline:
        at = unpack_from(layout.offset, data, at)[0]
    try:
        return sum(unpack_from(f"{layout.order}{values}{INTEGERS[kind]}", data, at))
    except (StructError, OverflowError):  # past the end: Pillow skips the tag
        return 0


def _check_tile_sides(data, entries: dict, layout: _Layout) -> None:
    """Refuse a tiled page (tiles when there are no strips, as Pillow reads it) whose tile holds more than
    ``MAX_TILE_PIXELS`` and 4 times the page's pixels, or whose tile size is not stored as an unsigned integer."""
    if STRIPS in entries or TILES not in entries:
        return
    if odd := [tag for tag in (TILE_WIDTH, TILE_LENGTH) if tag in entries and entries[tag][0] not in INTEGERS]:
        raise StructureError(f"TIFF of {len(data)} bytes whose tile size (tag {odd[0]}) is of type "
                             f"{entries[odd[0]][0]}, not an unsigned integer: refused")
    width, length = _value(data, entries, TILE_WIDTH, layout, 0), _value(data, entries, TILE_LENGTH, layout, 0)
    columns, rows = _value(data, entries, WIDTH, layout, 1), _value(data, entries, LENGTH, layout, 1)
    if width * length > max(MAX_TILE_PIXELS, 4 * columns * rows):
        raise StructureError(f"TIFF of {len(data)} bytes whose tiles are {width}x{length} pixels on a page of "
                             f"{columns}x{rows}: refused (a tile is decoded whole: at most {MAX_TILE_PIXELS} pixels "
                             "or 4 times the page)")


def _page_pieces(data, page: _Directory, layout: _Layout) -> tuple[int, int]:
    """The strips or tiles of an uncompressed page that Pillow sets up in Python, and the bytes of pixels they
    must hold ((0, 0) for a compressed page: libtiff reads it), refused past what the page's size needs or
    ``MAX_PAGE_PIECES``."""
    entries = page.entries
    if _value(data, entries, COMPRESSION, layout, 1) != 1 or not {STRIPS, TILES} & entries.keys():
        return 0, 0
    columns, rows = _value(data, entries, WIDTH, layout, 1), _value(data, entries, LENGTH, layout, 1)
    samples = _value(data, entries, SAMPLES, layout, 1)
    planes = samples if _value(data, entries, PLANAR, layout, 1) == 2 else 1
    if STRIPS in entries:
        listed = page.counts[STRIPS]
        needed = -(-rows // max(min(_value(data, entries, ROWS, layout, rows), rows), 1))
    else:
        listed = page.counts[TILES]
        width, length = _value(data, entries, TILE_WIDTH, layout, 0), _value(data, entries, TILE_LENGTH, layout, 0)
        if not (width and length):  # Pillow refuses tiles of no size
            return 0, 0
        needed = -(-columns // width) * -(-rows // length)
    needed *= planes
    if listed > needed:  # Pillow wraps the extra ones into layers and decodes every one
        raise StructureError(f"TIFF of {len(data)} bytes listing {listed} strips or tiles where its {columns}x{rows} "
                             f"page needs {needed}: refused")
    if listed > MAX_PAGE_PIECES:
        raise StructureError.too_many("TIFF", "strips or tiles in one page", MAX_PAGE_PIECES, len(data))
    bits = _value(data, entries, BITS, layout, 1)
    return listed, columns * rows * samples * bits // 8
