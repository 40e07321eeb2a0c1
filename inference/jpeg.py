"""What is particular to JPEG: the DCT-domain reduction's quality rule (:func:`jpeg_scale`) and its decode,
the batched (GPU: nvjpeg) decoder, and EXIF orientation (of any format) applied to an image or a decoded tensor.

torchvision 0.29's ``decode_jpeg`` applies EXIF orientation on the CPU only: with a list of images on a CUDA
device it drops ``apply_exif_orientation`` (its docstring: "Only implemented for JPEG format on CPU"), so a
phone's portrait photo (orientation 6) came back sideways from nvjpeg. The batched decoder therefore never
asks for it, and :func:`exif_orient` turns every decoded image upright, on whichever device it is, as
Pillow's ``ImageOps.exif_transpose`` does (``tests/inference/test_jpeg.py`` compares all eight).
"""
from __future__ import annotations

import io
from typing import Callable

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

JPEG_FORMATS = ("JPEG", "MPO")  # Pillow's names for files that start with JPEG_MAGIC
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
JPEG_SCALES = (8, 4, 2)          # libjpeg-turbo's DCT-domain reductions (1/8, 1/4, 1/2) that Pillow's draft uses
EXIF_ORIENTATION = 0x0112        # the EXIF tag: 1 upright, 2-8 mirrored and/or rotated
PIL_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # as exif_transpose turns them
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def jpeg_scale(width: int, height: int, min_side: int | None) -> int:
    """The DCT-domain reduction to decode a ``width x height`` JPEG at: 8, 4, 2 or 1 (full size).

    The quality rule: the strongest reduction whose result still has a shorter side of at least
    ``min_side`` pixels, so that the evaluation transform (which resizes the shorter side to
    ``min_side``, antialiased) only ever shrinks, never enlarges, and works from at least as many
    pixels as it outputs. libjpeg's scaled IDCT averages each 8x8 block's frequencies properly (it is
    a low-pass filter, not a subsampling), so the reduced image is the full one band-limited to what
    the resize keeps anyway. ``tests/inference/test_images.py`` measures the agreement of predictions
    on 12 MP photos decoded both ways.
    """
    if not min_side:
        return 1
    short = min(width, height)
    return next((s for s in JPEG_SCALES if short // s >= min_side), 1)


def decode_jpeg_reduced(data: bytes | bytearray, scale: int) -> torch.Tensor:
    """The JPEG decoded at 1/``scale`` in the DCT domain, EXIF orientation applied (Pillow's ``draft``); a lossless
    JPEG (no quantization tables: no DCT, libjpeg cannot reduce it, and failed when asked to) at full size."""
    with Image.open(io.BytesIO(data), formats=JPEG_FORMATS) as im:
        width, height = im.size
        if im.quantization:
            im.draft("RGB", (width // scale, height // scale))  # libjpeg picks 1/scale: each side ceil(side / scale)
        rgb = upright(im).convert("RGB")
        t = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return t.view(rgb.height, rgb.width, 3).permute(2, 0, 1)  # channels-last memory: resized 2x faster


def orientation_of(im: Image.Image) -> int:
    """The EXIF orientation of an opened JPEG (1 when it has none, or none that is valid)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the image as stored, as decoders do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says: Pillow's ``ImageOps.exif_transpose`` without its rewriting
    of the EXIF block, which it does value by value in Python (a PNG whose 4 MiB EXIF held 524,288 fractions:
    5.5 s), for a block nothing here reads again."""
    im.load()  # first, as exif_transpose: a TIFF turns itself as it loads (and then has no orientation left)
    method = PIL_TRANSPOSE.get(orientation_of(im))
    return im.transpose(method) if method is not None else im


def exif_orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` (..., H, W) as EXIF ``orientation`` says to show it: Pillow's ``exif_transpose`` on a tensor
    (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise); a view, no copy."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-1, -2)
    if orientation in (2, 3, 6, 7):
        image = image.flip(-1)
    if orientation in (3, 4, 7, 8):
        image = image.flip(-2)
    return image


def batch_jpeg_decoder(device: torch.device | str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """torchvision's ``decode_jpeg`` over a list of JPEG byte tensors in ONE call, RGB, straight into
    ``device``'s memory (nvjpeg on a GPU), as stored: the caller applies :func:`exif_orient` (see above)."""
    return lambda datas: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)


def decode_batch(payloads: dict[int, bytes | bytearray], orientation: dict[int, int], decoder,
                 finish: Callable[[list[torch.Tensor]], list]) -> dict[int, object]:
    """The JPEGs ``payloads`` (position -> bytes) decoded in ONE call of the batch ``decoder`` (see
    :func:`batch_jpeg_decoder`), each turned upright by its EXIF ``orientation`` and the list passed through
    ``finish`` (to the canvas, same shapes together). One undecodable JPEG fails the whole call: then each is
    decoded alone on the same decoder, so the others keep their full-size decode; a JPEG that fails alone is
    left out of the answer (the caller decodes it on the CPU)."""
    if not payloads:  # torchvision's decode_jpeg refuses an empty list (ValueError): nothing to decode
        return {}
    order = list(payloads)
    tensors = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in order]
    try:
        decoded = [exif_orient(t, orientation[i]) for i, t in zip(order, decoder(tensors))]
        return dict(zip(order, finish(decoded)))
    except RuntimeError:
        out = {}
        for i, data in zip(order, tensors):
            try:
                out[i] = finish([exif_orient(decoder([data])[0], orientation[i])])[0]
            except RuntimeError:  # this one alone: the caller's CPU path
                pass
        return out
