"""inference.admission and the header bounds of inference.images.probe."""
import io
import struct

import numpy as np
import pytest
from PIL import Image

from inference.admission import DEFAULT_MAX_BATCH_PIXELS, admit, batch_pixel_budget
from inference.images import (
    FORMATS,
    ImageError,
    ImageInfo,
    ImageTooLargeError,
    UnsupportedFormatError,
    decode_rgb,
    probe,
)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PPM", "PCX"])
def test_formats_outside_the_allow_list_are_415_even_when_pillow_opens_them(fmt):
    data = _encode(Image.new("RGB", (16, 16), "red"), fmt)
    Image.open(io.BytesIO(data)).load()  # Pillow would decode it
    with pytest.raises(UnsupportedFormatError, match="unsupported image format") as e:
        decode_rgb(data)
    assert e.value.status == 415 and "JPEG" in str(e.value)
    # named by the plugins' prefix tests alone, without parsing (an EPS of 4 MiB took 1.1 s to be refused);
    # TGA has no signature: its first bytes are those of a CUR
    assert f"start like {'CUR' if fmt == 'TGA' else fmt}" in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_every_accepted_format_reports_its_header_facts(fmt):
    info = probe(_encode(Image.new("RGB", (40, 24), "blue"), fmt))
    assert info == ImageInfo(fmt, 40, 24, 1) and info.format in FORMATS and info.pixels == 960


def test_extreme_aspect_ratios_are_refused_from_the_header():
    strip = _encode(Image.new("L", (4000, 20)), "PNG")
    with pytest.raises(ImageTooLargeError, match="aspect ratio is beyond the limit of 20:1"):
        decode_rgb(strip)
    assert decode_rgb(strip, max_aspect_ratio=250).shape == (3, 20, 4000)
    tall = _encode(Image.new("L", (10, 500)), "GIF")
    with pytest.raises(ImageTooLargeError, match="10x500"):
        probe(tall)


def test_an_animation_of_many_frames_is_refused_and_a_short_one_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), (i % 256, i * 7 % 256, i * 13 % 256)) for i in range(1500)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    with pytest.raises(ImageTooLargeError, match="more than 1000 frames, the limit"):
        decode_rgb(data)
    short = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:3], duration=10)
    assert probe(short).frames == 3 and decode_rgb(short).shape == (3, 8, 8)


def test_own_pixel_limit_is_checked_before_pillows_guard():
    data = _encode(Image.new("1", (7000, 7000)), "PNG")  # 49 MP, under Pillow's 89 MP warning
    with pytest.raises(ImageTooLargeError, match="7000x7000 = 49000000 pixels; the limit is 40000000"):
        probe(data)
    with pytest.raises(ImageError, match="not an image"):
        probe(b"hello world")


def _info(mp: float) -> ImageInfo:
    return ImageInfo("PNG", int(mp * 1000), 1000)


def test_request_budget_413_and_batch_budget_503_in_order():
    errors = admit({0: [_info(10)], 1: [_info(30), _info(30), _info(10)], 2: [_info(50)], 3: [_info(30)],
                    4: [_info(5)]}, max_request_pixels=64_000_000, max_batch_pixels=80_000_000)
    assert errors[1].status == 413 and "70000000 pixels" in str(errors[1])  # 70 MP > 64 MP per request
    assert errors[3].status == 503 and errors[3].error == "busy" and "retry" in str(errors[3])  # 60 + 30 > 80
    assert set(errors) == {1, 3}  # 0, 2 and 4 (10 + 50 + 5 MP) are admitted


def test_the_first_request_that_fits_its_own_budget_is_always_admitted():
    errors = admit({5: [_info(60)], 6: [_info(1)]}, max_request_pixels=64_000_000, max_batch_pixels=50_000_000)
    assert 5 not in errors and errors[6].status == 503


@pytest.mark.parametrize("size, min_side, scale", [((1000, 750), 100, 4), ((1001, 749), 90, 8), ((640, 480), 256, 1),
                                                  ((4032, 3024), 256, 8), ((333, 1001), 160, 2)])
def test_decoded_pixels_are_what_the_decoder_gives(size, min_side, scale):
    """Checked against the decoder itself (libjpeg-turbo's scaled IDCT rounds each side up)."""
    data = _encode(Image.new("RGB", size, (90, 140, 200)), "JPEG", quality=80)
    info = probe(data)
    image = decode_rgb(data, min_side=min_side)
    assert info.decoded_pixels(min_side) == image.shape[1] * image.shape[2]
    assert image.shape[1:] == (-(-size[1] // scale), -(-size[0] // scale))
    assert info.decoded_pixels(None) == info.pixels == size[0] * size[1]  # the GPU's nvjpeg: full size
    png = probe(_encode(Image.new("RGB", size), "PNG"))
    assert png.decoded_pixels(min_side) == png.pixels  # only JPEGs are decoded reduced


@pytest.mark.parametrize("mode, options", [("CMYK", {}), ("L", {"progressive": True}), ("RGB", {"progressive": True}),
                                           ("RGB", {"format": "MPO", "save_all": True})])
def test_decoded_pixels_hold_for_every_kind_of_jpeg(mode, options):
    options = dict(options)
    fmt = options.pop("format", "JPEG")
    if fmt == "MPO":
        options["append_images"] = [Image.new(mode, (1000, 750), 90)]
    progressive = options.get("progressive", False)
    data = _encode(Image.new(mode, (1000, 750), 120), fmt, quality=80, **options)
    info = probe(data)
    image = decode_rgb(data, min_side=100)
    assert info.format == fmt and image.shape[1] * image.shape[2] == 250 * 188 and info.progressive == progressive
    # a progressive JPEG counts what libjpeg holds to decode it reduced: every coefficient, at full size
    assert info.decoded_pixels(100) == (1000 * 750 if progressive else 250 * 188)


def test_phone_photos_cost_their_reduced_size_on_the_cpu_and_full_size_on_the_gpu():
    """16 requests of one 12 MP JPEG: decoded reduced to 504x378 for a 256 resize, they all fit the 128 MP
    batch budget; at full size (nvjpeg) the first 10 do (10 x 12.2 MP) and the rest get 503."""
    phones = {i: [ImageInfo("JPEG", 4032, 3024)] for i in range(16)}
    assert admit(phones, min_side=256) == {}
    gpu = admit(phones, min_side=None)
    assert sorted(gpu) == list(range(10, 16)) and all(e.status == 503 for e in gpu.values())
    pngs = {i: [ImageInfo("PNG", 4032, 3024)] for i in range(16)}
    assert sorted(admit(pngs, min_side=256)) == list(range(10, 16))


def test_the_batch_budget_follows_the_decoder_unless_configured():
    """Reduced JPEG decoding (CPU): 128 MP; full-size nvjpeg (GPU): 24 MP a batch slot when that is more, so a
    full batch of 12 MP phone photos (4032x3024 = 12.2 MP) is admitted; a configured budget always wins."""
    phone = [ImageInfo("JPEG", 4032, 3024)]
    for batch in (1, 4, 8, 16, 64):
        cpu = batch_pixel_budget(None, batch_size=batch, full_size=False)
        gpu = batch_pixel_budget(None, batch_size=batch, full_size=True)
        assert cpu == DEFAULT_MAX_BATCH_PIXELS and gpu == max(DEFAULT_MAX_BATCH_PIXELS, batch * 24_000_000)
        full_batch = {i: phone for i in range(batch)}
        assert admit(full_batch, max_batch_pixels=gpu) == {}  # nvjpeg: every photo at full size, all admitted
        assert admit(full_batch, max_batch_pixels=cpu, min_side=256) == {}  # reduced to 504x378 on the CPU
        assert batch_pixel_budget(5_000_000, batch_size=batch, full_size=True) == 5_000_000
    # the old fixed 128 MP on a GPU: ten phone photos of a batch of 16, the other six 503
    refused = admit({i: phone for i in range(16)}, max_batch_pixels=DEFAULT_MAX_BATCH_PIXELS)
    assert sorted(refused) == list(range(10, 16)) and all(e.status == 503 for e in refused.values())


def test_probe_requests_names_the_first_refused_image_of_its_request():
    from inference.admission import probe_requests
    from inference.requests import Request
    good = _encode(Image.new("RGB", (40, 30), "red"), "PNG")
    wide = _encode(Image.new("RGB", (400, 10), "red"), "PNG")
    requests = {0: Request([good, good], multi=True), 1: Request([good, wide, b"junk"], multi=True),
                2: Request([wide]), 4: Request([good])}
    infos, errors = probe_requests(requests, max_aspect_ratio=20.0)
    assert sorted(infos) == [0, 4] and [(x.width, x.height) for x in infos[0]] == [(40, 30), (40, 30)]
    assert sorted(errors) == [1, 2] and isinstance(errors[1], ImageTooLargeError)
    assert str(errors[1]).startswith("image 1 of 3: ") and "aspect" in str(errors[1])  # the wide one, not the junk
    assert str(errors[2]).startswith("image is 400x10")  # a single image's error is its own


def _rle8_bmp(width: int, height: int) -> tuple[bytes, np.ndarray]:
    """A BI_RLE8 BMP of grey runs (by hand: Pillow writes no RLE) and the pixels it holds, top row first."""
    rows, pixels = b"", np.zeros((height, width), np.uint8)
    for y in range(height):  # BMP rows go bottom-up
        row_value = (7 * y) % 256
        for x in range(0, width, 200):
            n = min(200, width - x)
            rows += bytes([n, (row_value + x // 200) % 256])
            pixels[height - 1 - y, x:x + n] = (row_value + x // 200) % 256
        rows += b"\x00\x00"  # end of line
    rows += b"\x00\x01"  # end of bitmap
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    offset = 14 + 40 + len(palette)
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + dib + palette + rows, pixels


def test_an_rle_bmp_counts_eight_times_its_pixels_and_decodes_to_its_runs():
    """Pillow decodes RLE BMPs in Python (a 9 KB file of 40 MP held a thread 5.5 s, ~8x a PNG's time a pixel):
    each counts PYTHON_DECODE_WEIGHT times its pixels, in the image limit and in the request and batch budgets."""
    from inference.images import PYTHON_DECODE_WEIGHT
    data, pixels = _rle8_bmp(1000, 600)
    info = probe(data)
    assert info.python_decoded and info.decoded_pixels(256) == 600_000 * PYTHON_DECODE_WEIGHT == 4_800_000
    rgb = decode_rgb(data).numpy()
    assert all(np.array_equal(rgb[c], pixels) for c in range(3))  # the runs as written (grey palette)
    assert not probe(_encode(Image.new("RGB", (40, 24)), "BMP")).python_decoded  # an uncompressed BMP: C
    big, _ = _rle8_bmp(3000, 2000)  # 6 MP: 48 MP counted, over the 40 MP limit
    with pytest.raises(ImageTooLargeError, match="3000x2000 = 6000000 pixels; the limit is 40000000 .an RLE-compressed"):
        probe(big)
    errors = admit({0: [info] * 13, 1: [info] * 14})  # 62.4 MP counted: in; 67.2: over the request budget
    assert list(errors) == [1] and errors[1].status == 413 and "RLE-compressed BMPs count 8x" in str(errors[1])
