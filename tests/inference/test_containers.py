"""inference.containers: the segment walk refuses files of more markers, chunks, blocks or tags than real images
have (which Pillow would read one by one in Python), and passes every real image: those the installed packages
ship, and Pillow-written extremes (1,000-frame animations, 999-page TIFFs, 1 MB ICC profiles, BigTIFF)."""
from __future__ import annotations

import importlib.util
import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from inference.containers import (
    MAX_COMPRESSED_CHUNKS,
    MAX_EXIF_BYTES,
    MAX_HEADER_UNITS,
    StructureError,
    check_structure,
    unit_limit,
)
from inference.images import ImageError, decode_rgb, probe
from inference.tiff_ifds import MAX_COLOURS, MAX_FRACTIONS, MAX_PAGE_PIECES, MAX_TAGS, MAX_TIFF_TAGS, PAGE_TAGS
from tests.conftest import pattern_image
from tools.photos import phone_photo

FRAMES = 1000  # images.DEFAULT_MAX_FRAMES


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photo(size: int = 64) -> Image.Image:
    return Image.fromarray(pattern_image("circle", size=size, seed=3))


def _png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with(png: bytes, units: bytes, *, before: bytes) -> bytes:
    """``units`` inserted before the first chunk of type ``before`` (found by walking the real chunks)."""
    i = 8
    while png[i + 4:i + 8] != before:
        i += 12 + struct.unpack_from(">I", png, i)[0]
    return png[:i] + units + png[i:]


def _png_in_small_chunks(size: int = 32) -> bytes:
    """A grey ramp whose compressed data is written one byte per IDAT chunk (valid, if odd)."""
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)  # 8-bit greyscale
    raw = zlib.compress(b"".join(b"\x00" + bytes(range(0, 8 * size, 8)) for _ in range(size)))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + b"".join(_png_chunk(b"IDAT", raw[i:i + 1]) for i in range(len(raw))) + _png_chunk(b"IEND"))


def _jpeg_with(jpeg: bytes, units: bytes) -> bytes:
    """``units`` inserted just before the first scan (SOS), after the photo's own EXIF, tables and frame."""
    i = 2
    while jpeg[i + 1] != 0xDA:
        i += 2 + struct.unpack_from(">H", jpeg, i + 2)[0]
    return jpeg[:i] + units + jpeg[i:]


def _gif_with(gif: bytes, units: bytes) -> bytes:
    """``units`` inserted after the header and global colour table, before the first block."""
    flags = gif[10]
    head = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    return gif[:head] + units + gif[head:]


def _tiff_tags(n: int, **kwargs) -> bytes:
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for k in range(n):
        ifd[50000 + k] = k  # private tags (50000+: none that Pillow treats specially)
    return _save(_photo(), "TIFF", tiffinfo=ifd, **kwargs)


def _tiff_by_hand(pixels: np.ndarray, *, tile: int | None = None, rows: int = 1, planar: bool = False,
                  extra: int = 0, more_tags: tuple = (), shared: bool = False, compression: int = 1) -> bytes:
    """An uncompressed TIFF page of ``pixels`` (H x W x C uint8), written by hand as Pillow cannot: in
    ``tile`` x ``tile`` tiles or ``rows``-row strips, chunky or planar (one plane after another), listing
    ``extra`` further pieces (copies of the last offset) beyond what the page needs, and ``more_tags``
    ((tag, type, count, value) entries) after the sorted ones; ``shared``: every piece at the first one's bytes."""
    height, width, channels = pixels.shape
    planes = [pixels[..., c:c + 1] for c in range(channels)] if planar else [pixels]
    pieces = []
    for plane in planes:
        if tile:
            padded = np.zeros((-(-height // tile) * tile, -(-width // tile) * tile, plane.shape[2]), np.uint8)
            padded[:height, :width] = plane
            pieces += [padded[y:y + tile, x:x + tile].tobytes() for y in range(0, height, tile)
                       for x in range(0, width, tile)]
        else:
            pieces += [plane[y:y + rows].tobytes() for y in range(0, height, rows)]
    body, offsets, at = (pieces[0] if shared else b"".join(pieces)), [], 8
    for piece in pieces:
        offsets.append(at)
        at += 0 if shared else len(piece)
    offsets += [offsets[-1]] * extra
    counts = [len(x) for x in pieces] + [len(pieces[-1])] * extra
    n = len(offsets)
    arrays = 8 + len(body)
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, compression),
            (262, 3, 1, 2 if channels == 3 else 1), (277, 3, 1, channels), (284, 3, 1, 2 if planar else 1)]
    if tile:
        tags += [(322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, arrays), (325, 4, n, arrays + 4 * n)]
    else:
        tags += [(273, 4, n, arrays), (278, 3, 1, rows), (279, 4, n, arrays + 4 * n)]
    if channels == 3:  # BitsPerSample: three values, stored after the arrays
        tags[2] = (258, 3, 3, arrays + 8 * n)
    tags = sorted(tags) + list(more_tags)
    ifd = arrays + 8 * n + 8
    return (b"II*\x00" + struct.pack("<I", ifd) + body + struct.pack(f"<{n}I", *offsets)
            + struct.pack(f"<{n}I", *counts) + struct.pack("<4H", 8, 8, 8, 0) + struct.pack("<H", len(tags))
            + b"".join(struct.pack("<HHII", t, k, c, v) if not (k == 3 and c == 1) else
                       struct.pack("<HHIHH", t, k, c, v, 0) for t, k, c, v in tags) + struct.pack("<I", 0))


def _tiff_strips(n: int) -> bytes:
    """A 64x64 greyscale page in one-row strips, listing ``n`` strips in all (Pillow decodes the extra ones
    into further layers)."""
    return _tiff_by_hand(np.zeros((64, 64, 1), np.uint8), extra=n - 64)


RGB = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
HAND_TIFFS = {"16x16 tiles": dict(tile=16), "planar, 1-row strips": dict(planar=True),
              "planar 16x16 tiles": dict(tile=16, planar=True), "5-row strips": dict(rows=5)}


@pytest.mark.parametrize("name", HAND_TIFFS)
def test_tiled_and_planar_tiffs_pass_and_one_piece_too_many_is_refused(name):
    """Pillow (the independent reader) decodes the hand-written pages to their pixels: the geometry is right, and
    the pieces it needs pass; one more is refused."""
    data = _tiff_by_hand(RGB, **HAND_TIFFS[name])
    check_structure(data, max_frames=FRAMES)
    assert np.array_equal(decode_rgb(data).permute(1, 2, 0).numpy(), RGB)
    with pytest.raises(StructureError, match="strips or tiles where its 50x37 page needs"):
        check_structure(_tiff_by_hand(RGB, **HAND_TIFFS[name], extra=1), max_frames=FRAMES)


def _tiff_deflate_tiled(pixels: np.ndarray, tile: tuple[int, int]) -> bytes:
    """A deflate-compressed (8) RGB TIFF page of ``pixels`` in ``tile`` (width, length) tiles, by hand."""
    height, width, _ = pixels.shape
    tw, tl = tile
    pieces = []
    for y in range(0, height, tl):
        for x in range(0, width, tw):
            padded = np.zeros((tl, tw, 3), np.uint8)
            part = pixels[y:y + tl, x:x + tw]
            padded[:part.shape[0], :part.shape[1]] = part
            pieces.append(zlib.compress(padded.tobytes(), 9))
    n, body = len(pieces), b"".join(pieces)
    offsets = [8 + sum(len(q) for q in pieces[:k]) for k in range(n)]
    arrays = 8 + len(body)
    tags = sorted([(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, arrays + 8 * n), (259, 3, 1, 8),
                   (262, 3, 1, 2), (277, 3, 1, 3), (322, 4, 1, tw), (323, 4, 1, tl), (324, 4, n, arrays),
                   (325, 4, n, arrays + 4 * n)])
    if n == 1:  # one value fits the entry itself
        tags = [(t, k, c, {324: offsets[0], 325: len(pieces[0])}.get(t, v)) for t, k, c, v in tags]
    ifd = arrays + 8 * n + 8
    return (b"II*\x00" + struct.pack("<I", ifd) + body + struct.pack(f"<{n}I", *offsets)
            + struct.pack(f"<{n}I", *map(len, pieces)) + struct.pack("<4H", 8, 8, 8, 0) + struct.pack("<H", len(tags))
            + b"".join(struct.pack("<HHII", t, k, c, v) if not (k == 3 and c == 1) else
                       struct.pack("<HHIHH", t, k, c, v, 0) for t, k, c, v in tags) + struct.pack("<I", 0))


def test_a_compressed_tile_far_larger_than_its_page_is_refused_and_real_tilings_pass():
    """libtiff decodes each tile into a buffer of the whole tile: a 64x64 page declaring one 16384x8192 tile
    (a 400 KB file, admitted as 4,096 pixels) took 384 MB and 1.1 s. Power-of-two tilings up to 4096 on small
    pages (GDAL's blocks), and tiles of the page's own size, pass and decode to their pixels (Pillow/libtiff);
    a tile size stored signed (libtiff reads it; the walk would not) is refused."""
    from inference.tiff_ifds import MAX_TILE_PIXELS
    for tile in ((256, 256), (512, 512), (48, 48), (64, 16), (2048, 16), (1024, 1024)):
        data = _tiff_deflate_tiled(RGB, tile)
        check_structure(data, max_frames=FRAMES)
        assert np.array_equal(decode_rgb(data).permute(1, 2, 0).numpy(), RGB), tile
    one = _tiff_deflate_tiled(RGB, (64, 48))  # one tile: its declared size patched below (the check reads no pixel)
    for tile in ((16384, 8192), (4096, 4112)):
        assert tile[0] * tile[1] > MAX_TILE_PIXELS
        data = one.replace(struct.pack("<HHII", 322, 4, 1, 64), struct.pack("<HHII", 322, 4, 1, tile[0]))
        data = data.replace(struct.pack("<HHII", 323, 4, 1, 48), struct.pack("<HHII", 323, 4, 1, tile[1]))
        with pytest.raises(StructureError, match=f"tiles are {tile[0]}x{tile[1]} pixels on a page of 50x37"):
            check_structure(data, max_frames=FRAMES)
    signed = bytearray(one)
    at = signed.index(struct.pack("<HH", 322, 4))  # TileWidth, LONG -> SLONG (type 9)
    signed[at + 2:at + 4] = struct.pack("<H", 9)
    with pytest.raises(StructureError, match="tile size .tag 322. is of type 9"):
        check_structure(bytes(signed), max_frames=FRAMES)


def _exif_of(size: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112], exif[0x010E] = 6, "x" * size  # turned, and a long ImageDescription
    return exif.tobytes()


def _texts(n: int):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k in range(n):
        info.add_text(f"key{k}", "some words " * 100, zip=True)
    return info


def _jpeg_after_soi(units: bytes) -> bytes:
    jpeg = _save(_photo(), "JPEG")
    return jpeg[:2] + units + jpeg[2:]


def _tiff_fractions(n: int) -> bytes:
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd.tagtype[50000] = 5  # RATIONAL
    ifd[50000] = tuple(TiffImagePlugin.IFDRational(k + 1, 3) for k in range(n))
    return _save(_photo(), "TIFF", tiffinfo=ifd)


def _tiff_exif(tags: int, *, orientation: int = 1) -> bytes:
    """A TIFF whose EXIF directory (a sub-directory of the page's) holds ``tags`` tags, a camera's fractions
    among them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    sub = exif.get_ifd(0x8769)
    sub[0x829A] = TiffImagePlugin.IFDRational(1, 125)  # ExposureTime
    sub[0x829D] = TiffImagePlugin.IFDRational(18, 10)  # FNumber
    for k in range(tags - 2):
        sub[40000 + k] = k
    exif[0x8769] = sub
    return _save(_photo(), "TIFF", exif=exif)


def _gif_out_of_phase(k: int = 16384) -> bytes:
    """An extension whose first sub-block is empty: Pillow reads on to the next empty one, through 2-byte
    sub-blocks (01 FF), where a walk that ended the extension there sees 256-byte ones, a byte out of phase."""
    end = 3 + 256 * k + 1
    body = bytearray(end + 1)
    body[0:3] = b"\x03\x21\x01"
    body[3:end - 1] = b"\xff\x01" * ((end - 4) // 2) + b"\xff" * ((end - 4) % 2)
    return _gif_with(_save(_photo(), "GIF"), b"\x21\x01\x00" + bytes(body))


def _progressive(extra_scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated ``extra_scans`` times (libjpeg goes over every block in
    each: 1,000 empty scans of a 4096x4096 image took 2.2 s)."""
    jpeg = _save(_photo(256), "JPEG", progressive=True, quality=90)
    last = jpeg.rfind(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * extra_scans + jpeg[-2:]


def _scans_after_the_first(extra: int, *, progressive: bool = False, tem: bool = False) -> bytes:
    """A JPEG whose last scan is repeated ``extra`` times, each after a TEM marker (0xFF01, no length) when
    ``tem``: read as a length, its next two bytes (0xFFDA) made a walk jump over the scans that follow."""
    jpeg = _save(_photo(256), "JPEG", progressive=progressive, quality=90)
    last = jpeg.rfind(b"\xff\xda")
    return jpeg[:-2] + (b"\xff\x01" * tem + jpeg[last:-2]) * extra + jpeg[-2:]


def _with_exif_of(fmt: str, tags: int) -> bytes:
    exif = Image.Exif()
    for k in range(tags):
        exif[40000 + k] = k
    return _save(_photo(), fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))


def _frames(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), (i % 256, i * 7 % 256, 90)) for i in range(n)]


def _shipped_images() -> list[Path]:
    """Every PNG, JPEG, GIF and TIFF in the installed packages that carry sample images."""
    found = []
    for name in ("matplotlib", "skimage", "sklearn", "foolbox", "PIL"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations)))
            found += [p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".tif",
                                                                          ".tiff")]
    return sorted(found)


def test_every_image_the_installed_packages_ship_passes():
    paths = _shipped_images()
    assert len(paths) > 100, "matplotlib alone ships hundreds of PNGs"
    for path in paths:
        check_structure(path.read_bytes(), max_frames=FRAMES)  # raises StructureError if refused


LEGITIMATE = {
    "phone photo (12 MP, EXIF)": lambda: phone_photo(_photo(200), noise=0.0, sideways=True),
    "JPEG, 1 MB ICC profile (16 APP2 segments)": lambda: _save(_photo(), "JPEG", icc_profile=bytes(2**20)),
    "progressive JPEG": lambda: _save(_photo(), "JPEG", progressive=True, quality=90),
    f"JPEG, {MAX_HEADER_UNITS - 20} COM markers": lambda: _jpeg_with(_save(_photo(), "JPEG"),  # + its own ~15
                                                                   b"\xff\xfe\x00\x02" * (MAX_HEADER_UNITS - 20)),
    f"PNG, {MAX_HEADER_UNITS - 10} text chunks": lambda: _png_with(
        _save(_photo(), "PNG"), _png_chunk(b"tEXt", b"k\x00v") * (MAX_HEADER_UNITS - 10), before=b"IDAT"),
    "PNG, image data in 1-byte chunks": lambda: _png_in_small_chunks(),
    f"APNG, {FRAMES} frames": lambda: _save(_frames(FRAMES)[0], "PNG", save_all=True,
                                           append_images=_frames(FRAMES)[1:]),
    f"GIF, {FRAMES} frames": lambda: _save(_frames(FRAMES)[0], "GIF", save_all=True,
                                          append_images=_frames(FRAMES)[1:]),
    "TIFF, 999 pages": lambda: _save(_frames(999)[0], "TIFF", save_all=True, append_images=_frames(999)[1:]),
    f"TIFF, {MAX_TAGS - 20} tags": lambda: _tiff_tags(MAX_TAGS - 20),
    "BigTIFF": lambda: _save(_photo(), "TIFF", big_tiff=True),
    "TIFF, 64 one-row strips": lambda: _tiff_strips(64),
    "TIFF, a camera's EXIF directory, turned": lambda: _tiff_exif(40, orientation=6),
    "TIFF, 999 fax pages in 30 strips each": lambda: _save(
        Image.new("1", (200, 300), 1), "TIFF", save_all=True, compression="group4", strip_size=256,
        append_images=[Image.new("1", (200, 300), k % 2) for k in range(998)]),
    "JPEG, 60 KB of EXIF": lambda: _save(_photo(), "JPEG", exif=_exif_of(60_000)),
    "PNG, an ICC profile and 10 compressed texts": lambda: _save(
        _photo(), "PNG", icc_profile=bytes(100_000), pnginfo=_texts(10)),
    "TIFF, 7200x5500 RGB in libtiff's 8 KiB strips": lambda: _save(
        Image.new("RGB", (7200, 5500), (9, 80, 200)), "TIFF", compression="tiff_deflate", strip_size=8192),
}


@pytest.mark.parametrize("name", LEGITIMATE)
def test_real_extremes_pass_and_decode(name):
    data = LEGITIMATE[name]()
    check_structure(data, max_frames=FRAMES)
    info = probe(data)
    assert sorted(decode_rgb(data, info=info).shape[1:]) == sorted((info.height, info.width))  # EXIF may turn it


HOSTILE = {  # name: (the file, the words of the refusal); each 1-4 MiB of units that Pillow reads one by one
    "JPEG, empty COM markers": (lambda: _jpeg_with(_save(_photo(), "JPEG", exif=_photo().getexif().tobytes()),
                                                   b"\xff\xfe\x00\x02" * 2**20), "markers and stray bytes before its image data"),
    "JPEG, fill bytes": (lambda: _jpeg_with(_save(_photo(), "JPEG"), b"\xff" * 2**20), "markers and stray bytes before"),
    "JPEG, just over the limit": (lambda: _jpeg_with(_save(_photo(), "JPEG"), b"\xff\xfe\x00\x02" * MAX_HEADER_UNITS),
                                  f"more than {MAX_HEADER_UNITS} markers"),
    "JPEG, stray bytes between segments": (lambda: _jpeg_with(_save(_photo(), "JPEG"), bytes(2**22)), "stray bytes"),
    "JPEG, escaped 0xFF between segments": (lambda: _jpeg_with(_save(_photo(), "JPEG"), b"\xff\x00" * 2**21),
                                            "stray bytes"),
    "PNG, empty chunks before the image": (lambda: _png_with(_save(_photo(), "PNG"), _png_chunk(b"teSt") * 350_000,
                                                             before=b"IDAT"), "chunks besides its image data"),
    "PNG, empty chunks after the image": (lambda: _png_with(_save(_photo(), "PNG"), _png_chunk(b"teSt") * 350_000,
                                                            before=b"IEND"), "chunks besides its image data"),
    "PNG, empty image-data chunks": (lambda: _png_with(_save(_photo(), "PNG"), _png_chunk(b"IDAT") * 350_000,
                                                       before=b"IDAT"), "more than 3"),  # unit_limit(4 MiB): 36,8xx
    "PNG, frame controls, then empty chunks": (lambda: _png_with(
        _save(_photo(), "PNG"), _png_chunk(b"fcTL", bytes(26)) * (FRAMES + 100) + _png_chunk(b"IDAT") * 300_000,
        before=b"IEND"), "chunks: refused"),  # frames earn a few chunks each, as many frames as are allowed
    "GIF, comment blocks": (lambda: _gif_with(_save(_photo(), "GIF"), b"\x21\xfe\x01x\x00" * 800_000),
                            "blocks, sub-blocks"),
    "GIF, 1-byte sub-blocks": (lambda: _gif_with(_save(_photo(), "GIF"), b"\x21\xfe" + b"\x01x" * 2**21 + b"\x00"),
                               "blocks, sub-blocks"),
    "GIF, stray bytes between blocks": (lambda: _gif_with(_save(_photo(), "GIF"), bytes(2**22)), "stray bytes"),
    "GIF, stray bytes to the end": (lambda: _save(_photo(), "GIF")[:-1] + bytes(2**22), "stray bytes"),
    "TIFF, a million strips of a 64x64 image": (lambda: _tiff_strips(10**6),
                                                "1000000 strips or tiles where its 64x64 page needs 64"),
    "TIFF, 65 one-row strips of a 64x64 image": (lambda: _tiff_strips(65), "65 strips or tiles where"),
    "JPEG, end of image, then empty COM markers": (  # Pillow reads on past EOI
        lambda: _jpeg_after_soi(b"\xff\xd9" + b"\xff\xfe\x00\x02" * 2**20), "markers and stray bytes"),
    "JPEG, JPG0 markers (no length)": (lambda: _jpeg_after_soi(b"\xff\xf0" * 2**21), "markers and stray bytes"),
    "JPEG, frame headers of 21,842 components": (lambda: _jpeg_after_soi(
        (b"\xff\xc0" + struct.pack(">HBHHB", 65534, 8, 64, 64, 0) + bytes(65526)) * 64), "markers and stray bytes"),
    "JPEG, EXIF over three APP1 segments": (lambda: _jpeg_after_soi(
        (b"\xff\xe1" + struct.pack(">H", 65535) + b"Exif\x00\x00" + bytes(65527)) * 3),
        f"more than {MAX_EXIF_BYTES}"),
    "PNG, 100 ICC profiles inflating to 1 MiB each": (lambda: _png_with(
        _save(_photo(), "PNG"), _png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(2**20), 9)) * 100,
        before=b"IDAT"), f"more than {MAX_COMPRESSED_CHUNKS} compressed"),
    "GIF, an extension's empty first sub-block": (_gif_out_of_phase, "blocks, sub-blocks"),
    "TIFF, 2,000 fractions in a tag": (lambda: _tiff_fractions(2000), f"more than {MAX_FRACTIONS} fractions"),
    "TIFF, an EXIF directory of 2,000 tags": (lambda: _tiff_exif(2000), f"more than {MAX_TAGS} tags in one directory"),
    "TIFF, a second ImageLength hiding 60,000 strips": (lambda: _tiff_by_hand(
        np.zeros((64, 64, 1), np.uint8), extra=59936, more_tags=[(257, 4, 1, 60000)]), "where its 64x64 page needs 64"),
    "TIFF, a colour map of 1.5 million values": (lambda: _tiff_by_hand(
        np.zeros((64, 64, 1), np.uint8), more_tags=[(320, 3, 1_500_000, 8)]), f"more than {MAX_COLOURS} colour map"),
    "TIFF, 1x1 tiles": (lambda: _tiff_by_hand(np.zeros((256, 255, 1), np.uint8), tile=1),
                        f"more than {MAX_PAGE_PIECES} strips or tiles in one page"),
    "TIFF, Pillow's other little-endian header": (lambda: b"II\x00*" + _tiff_strips(10**5)[4:],
                                                  "where its 64x64 page needs 64"),
    "TIFF, a cut-off last directory": (lambda: _tiff_strips(10**5)[:-4], "where its 64x64 page needs 64"),
    "TIFF, strips sharing their bytes": (lambda: _tiff_by_hand(np.zeros((2048, 410, 4), np.uint8), shared=True),
                                         "need 3358720 bytes of pixels"),
    "progressive JPEG, 100 scans": (lambda: _progressive(90), "more than 32 scans"),
    "sequential JPEG, 40 scans": (lambda: _scans_after_the_first(40), r"more than 3 scans \(one a component\)"),
    "progressive JPEG, scans behind TEM markers": (lambda: _scans_after_the_first(40, progressive=True, tem=True),
                                                   "more than 32 scans"),
    "TIFF, PackBits strips sharing their bytes": (lambda: _tiff_by_hand(
        np.zeros((2048, 256, 1), np.uint8), shared=True, compression=32773), "hold 524288 bytes: refused"),
    "TIFF, an XMP tag of 300,000 signed bytes": (lambda: _tiff_by_hand(
        np.zeros((64, 64, 1), np.uint8), more_tags=[(700, 6, 300_000, 8)]), "values that Pillow converts"),
    "PNG, an EXIF chunk of 2,000 tags": (lambda: _with_exif_of("PNG", 2000), "PNG's EXIF chunk, in a file of"),
    "WEBP, an EXIF chunk of 2,000 tags": (lambda: _with_exif_of("WEBP", 2000), "WEBP's EXIF chunk, in a file of"),
    "TIFF, one page of many tags": (lambda: _tiff_tags(5000), f"more than {MAX_TAGS} tags in one directory"),
    "BigTIFF, one page of many tags": (lambda: _tiff_tags(5000, big_tiff=True), "tags in one directory"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_files_of_too_many_units_are_refused_before_pillow_reads_them(name):
    make, words = HOSTILE[name]
    data = make()
    with pytest.raises(StructureError, match=words) as refused:
        check_structure(data, max_frames=FRAMES)
    assert refused.value.status == 400 and str(len(data)) in str(refused.value)
    for read in (probe, decode_rgb):  # the decoder's own entry points refuse it the same way, as a bad image
        with pytest.raises(ImageError, match=words):
            read(data)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF"])
def test_animations_of_too_many_tiny_frames_are_refused_for_their_frames(fmt):
    """5,000 frames of 8x8: more blocks than their bytes' share, but the walk stops (or stops earning) at the frame
    limit, so the answer is the frame limit's 413, as before the walk."""
    frames = _frames(5000 if fmt != "TIFF" else 1200)
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
    check_structure(data, max_frames=FRAMES)
    with pytest.raises(ImageError, match=f"more than {FRAMES} frames") as refused:
        probe(data)
    assert refused.value.status == 413


def test_a_tiff_of_more_tags_than_its_pages_may_hold_in_all_is_refused():
    """Pages of 1,000 tags each pass one by one; their sum over the pages read is bounded too (MAX_TIFF_TAGS,
    PAGE_TAGS a page, one per 256 bytes of the file)."""
    tags = [(50000 + k, 3, 1, 0) for k in range(MAX_TAGS - 24)]
    pages = 12
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for page in range(pages):
        ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHI4s", t, k, n, bytes(4)) for t, k, n, _ in tags)
        out += ifd + struct.pack("<I", len(out) + len(ifd) + 4 if page < pages - 1 else 0)
    limit = MAX_TIFF_TAGS + PAGE_TAGS * pages + len(out) // 256
    assert pages * len(tags) > limit and 8 * len(tags) < MAX_TIFF_TAGS + PAGE_TAGS * 8 + len(out) // 256
    with pytest.raises(StructureError, match="tags in its pages"):  # refused at the page that passes the limit
        check_structure(bytes(out), max_frames=FRAMES)
    check_structure(bytes(out), max_frames=7)  # 8 pages read: within it


def test_the_unit_limit_grows_with_the_file():
    assert unit_limit(0) == 4096 and unit_limit(16 * 2**20) == 4096 + 131072


def test_cut_off_corrupt_or_looping_files_end_the_walk_quietly():
    """Whatever the bytes, the walk raises StructureError or nothing: truncations, random byte flips, a TIFF
    whose page points at itself; Pillow then gives its own error."""
    rng = random.Random(0)
    valid = [_save(_photo(), fmt) for fmt in ("JPEG", "PNG", "GIF", "TIFF")] + [_tiff_tags(10, big_tiff=True)]
    for data in valid:
        for _ in range(200):
            broken = bytearray(data[:rng.randrange(1, len(data) + 1)])
            for _ in range(rng.randrange(0, 4)):
                broken[rng.randrange(len(broken))] = rng.randrange(256)
            try:
                check_structure(bytes(broken), max_frames=FRAMES)
            except StructureError:
                pass
    looping = bytearray(_save(_photo(), "TIFF"))
    first = struct.unpack_from("<I", looping, 4)[0]
    tags = struct.unpack_from("<H", looping, first)[0]
    struct.pack_into("<I", looping, first + 2 + 12 * tags, first)  # the next page: this one again
    check_structure(bytes(looping), max_frames=FRAMES)


def test_a_baseline_jpeg_of_several_scans_counts_at_full_size():
    """libjpeg holds every coefficient of a JPEG of several scans, progressive or not (a non-interleaved
    baseline 6000x6000: +209 MB, counted reduced to 0.56 MP): admission counts it at full size."""
    one, three = _save(_photo(256), "JPEG"), _scans_after_the_first(2)
    assert not probe(one).progressive and probe(three).progressive
    assert probe(three).decoded_pixels(32) == 256 * 256 > probe(one).decoded_pixels(32)
