import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import encode, pattern_image
from training.images import ImageError, ImageTooLargeError, decode_rgb


def test_png_and_jpeg_decode_to_rgb_uint8():
    arr = pattern_image("circle", size=30)
    png = decode_rgb(encode(arr, "PNG"))
    assert png.dtype == torch.uint8 and png.shape == (3, 30, 30)
    assert torch.equal(png, torch.from_numpy(arr).permute(2, 0, 1))
    jpg = decode_rgb(encode(arr, "JPEG", quality=95))
    assert jpg.shape == (3, 30, 30) and (jpg.int() - png.int()).abs().float().mean() < 8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode):
    img = Image.fromarray(pattern_image("vertical", size=16)).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = decode_rgb(buf.getvalue())
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)


def test_bmp_falls_back_to_pillow():
    arr = pattern_image("horizontal", size=12)
    assert torch.equal(decode_rgb(encode(arr, "BMP")), torch.from_numpy(arr).permute(2, 0, 1))


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_rgb(buf.getvalue())
    assert out.shape == (3, 20, 10)
    assert out[:, :10].float().mean() > 200 > out[:, 10:].float().mean()  # white half now on top


@pytest.mark.parametrize("data,match", [
    (b"", "empty body"),
    (b"hello, this is text, not an image", "not an image"),
    (bytes(range(256)) * 4, "not an image"),
])
def test_non_images_raise_400(data, match):
    with pytest.raises(ImageError, match=match) as e:
        decode_rgb(data)
    assert e.value.status == 400


def test_truncated_jpeg_raises_400():
    data = encode(pattern_image("circle", size=256), "JPEG")
    with pytest.raises(ImageError, match="cannot decode the 256x256 image") as e:
        decode_rgb(data[: len(data) // 2])
    assert e.value.status == 400


def test_decompression_bomb_is_refused_from_the_header():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # ~50 KB file, 400 M pixels
    with pytest.raises(ImageTooLargeError, match="pixels") as e:
        decode_rgb(buf.getvalue())
    assert e.value.status == 413
