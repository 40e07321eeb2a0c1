"""inference.jpeg: EXIF orientation on a decoded tensor, checked against Pillow's exif_transpose (an independent
reference) for all eight orientations, and the batched decoder's path (nvjpeg on a GPU; here torchvision's
CPU decoder, which like nvjpeg is asked for the image as stored) giving upright images."""
import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from inference.images import decode_many, decode_rgb, probe
from inference.jpeg import batch_jpeg_decoder, exif_orient


def photo(orientation: int, size=(48, 32)) -> bytes:
    """A JPEG of an asymmetric pattern (a bright corner block, a gradient), stored with EXIF ``orientation``."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[: h // 3, : w // 4] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def pillow_upright(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def as_stored(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                       apply_exif_orientation=False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orient_is_pillows_exif_transpose(orientation):
    data = photo(orientation)
    assert probe(data).orientation == orientation
    upright = exif_orient(as_stored(data), orientation)
    reference = pillow_upright(data)
    assert upright.shape == reference.shape
    assert (upright.float() - reference.float()).abs().mean() < 2.0  # two JPEG decoders: rounding only
    assert torch.equal(upright, decode_rgb(data))  # the CPU path (torchvision with EXIF) agrees exactly


def test_the_batched_decoder_path_turns_every_photo_upright():
    """nvjpeg ignores EXIF orientation: a phone's portrait photo (6) was served sideways on a GPU."""
    payloads = [photo(o) for o in range(1, 9)]

    def nvjpeg_like(datas):  # what torchvision's CUDA path does with apply_exif_orientation=True: ignores it
        return decode_jpeg(datas, mode=ImageReadMode.RGB, apply_exif_orientation=False)

    for decoder in (nvjpeg_like, batch_jpeg_decoder("cpu")):
        out = decode_many(payloads, jpeg_batch_decoder=decoder)
        for data, image in zip(payloads, out):
            assert torch.equal(image, decode_rgb(data))


def test_a_retry_one_by_one_turns_the_photos_upright_too():
    refused = photo(1, size=(40, 40))
    payloads = [photo(6), refused, photo(8)]

    def decoder(datas):
        if any(bytes(d.numpy()) == refused for d in datas):
            raise RuntimeError("simulated nvjpeg failure")
        return batch_jpeg_decoder("cpu")(datas)

    out = decode_many(payloads, jpeg_batch_decoder=decoder)
    assert all(torch.equal(image, decode_rgb(data)) for data, image in zip(payloads, out))


def test_a_jpeg_without_or_with_a_broken_orientation_is_upright_as_stored():
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(buf, format="JPEG")
    assert probe(buf.getvalue()).orientation == 1
    assert probe(photo(1)).orientation == 1 and probe(photo(9)).orientation == 1  # 9: no such orientation
    assert torch.equal(decode_rgb(photo(9)), as_stored(photo(9)))  # decoded as stored, not turned


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_other_formats_are_turned_as_exif_transpose_does_without_rewriting_their_exif(fmt, orientation,
                                                                                     monkeypatch):
    """PNG (eXIf), WEBP and TIFF go through Pillow: ``upright`` turns them as exif_transpose does, but never
    rewrites the EXIF block (exif_transpose's Exif.tobytes, value by value in Python: 5.5 s for a PNG whose
    4 MiB EXIF held 524,288 fractions)."""
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        reference = torch.from_numpy(np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()).permute(2, 0, 1)

    def no_rewrite(self, *args, **kwargs):
        raise AssertionError("the EXIF block was rewritten")

    monkeypatch.setattr(Image.Exif, "tobytes", no_rewrite)
    assert torch.equal(decode_rgb(data), reference)


def _lossless_jpeg(width: int, height: int) -> bytes:
    """A lossless (SOF3) greyscale JPEG, by hand: one Huffman code, every difference 0 (libjpeg-turbo 3's
    ``cjpeg -lossless`` writes this frame type; Pillow cannot)."""
    sof = b"\xff\xc3" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    dht = b"\xff\xc4" + struct.pack(">H", 21) + b"\x00" + bytes([1, 1] + [0] * 14) + b"\x00\x01"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x01\x00\x00"
    return b"\xff\xd8" + sof + dht + sos + b"\x00" * ((width * height + 7) // 8) + b"\xff\xd9"


def test_a_lossless_jpeg_counts_and_decodes_at_full_size():
    """No DCT, nothing to reduce: asked for 1/2 it failed ("broken data stream") and admission counted it reduced."""
    data = _lossless_jpeg(600, 600)
    info = probe(data)
    assert info.decoded_pixels(256) == 600 * 600  # not 300x300: it is decoded whole
    with Image.open(io.BytesIO(data)) as im:  # Pillow's full-size decode: the reference
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(decode_rgb(data, min_side=256).permute(1, 2, 0).numpy(), expected)
