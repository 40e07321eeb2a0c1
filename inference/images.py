"""Bytes -> RGB uint8 ``(3, H, W)`` tensor: the one image decoder of the project.

Used by training's data loading and by the TorchServe handler, so served and offline pixels are
identical. The header is read first (Pillow reads only the header) so that decompression bombs are
refused before any pixel is allocated. JPEGs are decoded by libjpeg-turbo: at full size by torchvision
(faster than Pillow), or, when the caller says how large the image must stay (``min_side``, the
evaluation transform's resize size), at a reduced scale in the DCT domain (Pillow's ``draft``; see
:func:`jpeg_scale` for the rule), which makes a 12 MP phone photo several times cheaper to decode. Every
other format is decoded by Pillow. torchvision 0.29's PNG decoder crashes the process (segfault
after "libpng error: IDAT: incorrect data check") on a corrupted PNG, which our fuzz test found: one
such request would kill a TorchServe worker, so PNG/GIF/WEBP/BMP/TIFF never reach it.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from inference.containers import check_structure
from inference.image_errors import ImageError, ImageTooLargeError, PreprocessError, UnsupportedFormatError
from inference.jpeg import (  # noqa: F401  (batch_jpeg_decoder and jpeg_scale: re-exported, the handler's names)
    JPEG_EOI,
    JPEG_FORMATS,
    JPEG_MAGIC,
    batch_jpeg_decoder,
    decode_batch,
    decode_jpeg_reduced,
    jpeg_scale,
    orientation_of,
    upright,
)
from inference.transforms import transform_by_shape

# libtiff's scans a JPEG-compressed strip may have (100; a real one has 1; 6000x6000 at 90 empty ones: 2.4 s)
os.environ.setdefault("LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER", "16")
# torchvision 0.29 warns on every decode call that decoding moves to TorchCodec.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io.*")
warnings.filterwarnings("ignore", message=r".*TorchCodec.*")

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: a 7200x5500 photo (39.6 MP) passes, a 20000x20000 bomb does not
DEFAULT_MAX_ASPECT_RATIO = 20.0  # long side / short side: a 6:1 panorama passes, a 100000x50 strip does not
DEFAULT_MAX_FRAMES = 1000        # animated images: only frame 0 is decoded; far more frames is refused
OFFLINE_MAX_PIXELS, OFFLINE_MAX_ASPECT_RATIO = 150_000_000, 100.0  # read_image_file: training, evaluate, predict
PYTHON_DECODE_WEIGHT = 8  # an RLE BMP counts 8x its pixels: Pillow decodes RLE in Python (12 MP: 1.6 s, a PNG 0.19)
# The allow-list, by Pillow's name of the format read from the header (MPO: the multi-picture JPEG that
# many phones write). Anything else Pillow may open (ICO, PPM, TGA, PSD, ...) is refused.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP")
PLUGINS = [f for f in FORMATS if f != "MPO"]  # the plugins Pillow may try (JPEG's opens MPO files)
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"avif", b"avis"}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""
    format: str
    width: int
    height: int
    frames: int = 1
    orientation: int = 1  # EXIF (JPEG): what a decoder that ignores it must apply (inference.jpeg.exif_orient)
    progressive: bool = False  # several scans (libjpeg holds full-size coefficients) or lossless: counts full size
    python_decoded: bool = False  # an RLE-compressed BMP: counts PYTHON_DECODE_WEIGHT times its pixels

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decoded_pixels(self, min_side: int | None = None) -> int:
        """The pixels :func:`decode_rgb` decodes this image to with the same ``min_side``: a baseline JPEG
        reduced in the DCT domain by :func:`jpeg_scale` (each side rounded up, as libjpeg does), any other
        image at full size. What admission counts (``inference.admission``). A progressive JPEG counts at
        full size however it is decoded: libjpeg buffers all its scans' coefficients at full size (2 bytes
        each, ~3 bytes a pixel at 4:2:0) and reads every scan, so a few hundred KB can cost as much memory
        and time as a full-size decode (measured, 7000x5700 decoded to 875x713: 344 KB progressive +117 MB
        and 0.27 s; the same photo baseline +10 MB and 0.03 s). An RLE BMP counts :data:`PYTHON_DECODE_WEIGHT`
        times its pixels, for the time Pillow's Python decoder takes (a 9 KB file of 40 MP held a thread 5.5 s)."""
        reduced = self.format in JPEG_FORMATS and not self.progressive
        scale = jpeg_scale(self.width, self.height, min_side) if reduced else 1
        return -(-self.width // scale) * -(-self.height // scale) * (PYTHON_DECODE_WEIGHT if self.python_decoded else 1)


def probe(data: bytes | bytearray, *, max_pixels: int = DEFAULT_MAX_PIXELS,
          max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, max_frames: int = DEFAULT_MAX_FRAMES) -> ImageInfo:
    """Format, size and frame count from the header only, checked against the allow-list and the
    bounds: :class:`UnsupportedFormatError` (415), :class:`ImageTooLargeError` (413) or
    :class:`ImageError` (400), each naming the problem."""
    if not data:
        raise ImageError("empty body: expected the bytes of an image (JPEG, PNG, WEBP, GIF, BMP, TIFF)")
    try:
        scans = check_structure(data, max_frames=max_frames)  # before Pillow walks it in Python
        with Image.open(io.BytesIO(data), formats=PLUGINS) as im:  # no other plugin parses it (EPS: 1.1 s/4 MiB)
            fmt, (width, height) = im.format, im.size
            rle = bool(im.tile) and im.tile[0][0] == "bmp_rle"  # Pillow's decoder in Python
            if width * height * (PYTHON_DECODE_WEIGHT if rle else 1) > max_pixels:
                raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is "
                                         f"{max_pixels}" + (f" (an RLE-compressed BMP counts {PYTHON_DECODE_WEIGHT}x "
                                                            "its pixels: send it as PNG)" if rle else ""))
            if min(width, height) < 1 or max(width, height) / min(width, height) > max_aspect_ratio:
                raise ImageTooLargeError(f"image is {width}x{height}: its aspect ratio is beyond the limit of "
                                         f"{max_aspect_ratio:g}:1")
            if im.mode == "F":  # Pillow's RGB conversion clips floats to 0..255: a 0..1 image would be all black
                raise UnsupportedFormatError(f"{fmt} image of 32-bit floating-point pixels: send 8- or 16-bit "
                                             "integer pixels")
            frames = _frames(im, max_frames)
            if frames > max_frames:
                raise ImageTooLargeError(f"animated image of more than {max_frames} frames, the limit (only the "
                                         "first is used)")
            jpeg = fmt in JPEG_FORMATS
            return ImageInfo(fmt, width, height, frames, orientation_of(im) if jpeg else 1,
                             progressive=jpeg and (bool(im.info.get("progressive")) or scans > 1 or not im.quantization),
                             python_decoded=rle)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own hard limit (2 x MAX_IMAGE_PIXELS)
        raise ImageTooLargeError(f"image too large: {e}") from None
    except UnidentifiedImageError:
        other = _other_format(data)
        if other:
            raise UnsupportedFormatError(f"unsupported image format (its bytes start like {other}): send "
                                         f"{', '.join(FORMATS)}") from None
        raise ImageError(f"not an image: the {len(data)} bytes sent match no known image format") from None
    except Exception as e:  # Pillow raises various errors on broken headers
        raise ImageError(f"unreadable image header: {e}") from None


def _other_format(data: bytes | bytearray) -> str | None:
    """The format outside the allow-list that ``data`` starts like, by Pillow's plugins' prefix tests alone."""
    Image.init()
    prefix = bytes(data[:16])
    if prefix[4:8] == b"ftyp" and prefix[8:12] in HEIF_BRANDS:  # ISO-BMFF images: HEIC (iPhones), AVIF
        return f"HEIF/AVIF, brand {prefix[8:12].decode('latin-1')!r}; send iPhone photos as JPEG ('Most Compatible')"
    for name in Image.ID:
        accept = Image.OPEN.get(name, (None, None))[1] if name not in FORMATS else None
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a test that cannot read so short a prefix
            continue
    return None


def _frames(im: Image.Image, max_frames: int) -> int:
    """The frame count, or ``max_frames + 1`` when there are more. GIF and TIFF keep no count in their header:
    their frames are walked one by one, at most ``max_frames`` deep (a file of a million tiny frames is not
    walked to its end), reading headers only: a GIF through Pillow's own walk for ``n_frames``
    (``_seek(f, False)``: its public ``seek`` decodes every frame on the way), a TIFF page by page (its
    ``seek`` reads the page's tags; one far jump would miscount)."""
    if im.format not in ("GIF", "TIFF") or not getattr(im, "is_animated", False):
        return int(getattr(im, "n_frames", 1) or 1)
    step = (lambda f: im._seek(f, False)) if im.format == "GIF" else im.seek
    try:
        for frame in range(1, min(max_frames, 2**31) + 1):
            step(frame)
    except Exception:  # the end, or a later frame Pillow cannot read (cut off, odd mode): only frame 0 is used
        return frame  # frames 0 .. frame - 1
    finally:
        with contextlib.suppress(Exception):
            im.seek(0)
    return max_frames + 1


def image_size(data: bytes | bytearray) -> tuple[int, int]:
    """``(width, height)`` from the header only (no bounds); raises :class:`ImageError` for non-images."""
    return (info := probe(data, max_pixels=2**62, max_aspect_ratio=float("inf"), max_frames=2**62)).width, info.height


def _to_rgb_uint8(t: torch.Tensor) -> torch.Tensor:
    t = t[0] if t.ndim == 4 else t  # animated GIF/WEBP: the first frame
    if t.dtype == torch.uint16:  # 16-bit PNG
        t = (t.to(torch.int32) >> 8).to(torch.uint8)
    return t


def _decode_with_pillow(data: bytes | bytearray) -> torch.Tensor:
    """Few copies alive at once: the orientation applied in place, each converted image replacing the one
    before, the pixels' bytes copied once into the tensor's own buffer (a 6000x6000 RGBA PNG of 627 KB:
    peak RSS +618 MB with a copy kept at every step, +343 MB so)."""
    im = upright(Image.open(io.BytesIO(data), formats=PLUGINS))  # a file in memory: nothing to close
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # I;16B (big-endian TIFF) has no point(): through I
        im = (im if im.mode in ("I", "I;16") else im.convert("I")).point(lambda v: v / 256).convert("L")
    if im.mode != "RGB":
        im = im.convert("RGB")
    height, width, raw = im.height, im.width, im.tobytes()
    del im  # channels-last memory below: resized 2x faster
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


def decode_rgb(data: bytes | bytearray, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, max_frames: int = DEFAULT_MAX_FRAMES,
               info: ImageInfo | None = None, min_side: int | None = None) -> torch.Tensor:
    """Decode image bytes into an RGB uint8 ``(3, H, W)`` tensor with EXIF orientation applied (the
    first frame of an animated image).

    ``min_side``: the shorter side the caller needs (the evaluation transform's resize size,
    ``EvalPreset.min_decode_side``); a JPEG at least twice as large is decoded reduced in the DCT
    domain (:func:`jpeg_scale`), every other image at full size. ``None``: always full size.

    The header is checked first (:func:`probe`): 415 outside the allow-list of formats, 413 above
    ``max_pixels``, ``max_aspect_ratio`` or ``max_frames``, 400 for anything that is not a
    decodable image, each with a message that names the problem. ``info``: this image's :func:`probe`
    result with the same bounds, when the caller has already read it (the header is not read twice).
    """
    if info is None:
        info = probe(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio, max_frames=max_frames)
    width, height = info.width, info.height
    is_jpeg = bytes(data[:3]) == JPEG_MAGIC
    scale = jpeg_scale(width, height, min_side) if is_jpeg else 1
    if scale > 1:
        try:
            return decode_jpeg_reduced(data, scale)
        except Exception as e:
            raise ImageError(f"cannot decode the {width}x{height} image: {e}") from None
    if is_jpeg:
        buf = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
        try:
            return _to_rgb_uint8(decode_image(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True))
        except RuntimeError:  # broken or unusual JPEG: Pillow decides
            pass
    try:
        return _decode_with_pillow(data)
    except Exception as e:
        raise ImageError(f"cannot decode the {width}x{height} image: {e}") from None


def read_image_file(path: str, *, min_side: int | None = None, max_pixels: int = OFFLINE_MAX_PIXELS,
                    max_aspect_ratio: float = OFFLINE_MAX_ASPECT_RATIO) -> torch.Tensor:
    """:func:`decode_rgb` of a file's bytes (the same decoder as the server's, so offline and served pixels of one
    file are identical when ``min_side`` is the same), with offline bounds: a 48-50 MP phone photo or a panorama
    is the user's own file here, not a stranger's request (the server's ``max_pixels`` is 40 MP, 20:1)."""
    with open(path, "rb") as f:
        return decode_rgb(f.read(), min_side=min_side, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)


def decode_many(payloads: list[bytes | bytearray], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, max_frames: int = DEFAULT_MAX_FRAMES,
                device=None, pool=None, jpeg_batch_decoder=None, infos: list[ImageInfo] | None = None,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                min_side: int | None = None, memory=None) -> list[torch.Tensor | ImageError]:
    """Decode many images; each result is an RGB uint8 ``(3, H, W)`` tensor on ``device`` (through ``transform``
    when given) or the :class:`ImageError` that image raised (one bad image never fails the others).

    Bounded memory: with ``transform`` (the evaluation transform to the canvas), each image is decoded,
    transformed and its full-size pixels released before the next one starts (one at a time per thread of
    ``pool``, and with ``memory``, an ``inference.decode_memory.DecodeMemory``, only while the decodes
    running hold at most its bytes). ``min_side`` goes to :func:`decode_rgb` (reduced JPEGs on the CPU).

    ``jpeg_batch_decoder``, when given, decodes all JPEGs (after their header check) in ONE call at
    full size, e.g. ``batch_jpeg_decoder("cuda")`` for nvjpeg on the GPU, and a ``transform`` with a
    ``batch`` method (:class:`inference.transforms.EvalPreset`) then resizes the ones of one shape
    together (``inference.transforms.transform_by_shape``: a few kernel launches per group, not per
    image). Other formats, and every JPEG again if the batched call fails, go through
    :func:`decode_rgb` (in ``pool`` when given) and are moved to ``device``. ``infos``: the images'
    :func:`probe` results, when the caller has read the headers already (admission control).
    """
    limits = dict(max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio, max_frames=max_frames)
    finish = transform if transform is not None else (lambda image: image)

    def one(item):
        data, info = item
        with memory.hold(memory.cost(info, min_side)) if memory is not None and info else contextlib.nullcontext():
            try:
                image = decode_rgb(data, **limits, info=info, min_side=min_side)
            except Exception as e:  # an ImageError, or a decoder's unforeseen one: this image's alone, never the batch's
                return e if isinstance(e, ImageError) else PreprocessError(f"decoding failed: {type(e).__name__}: {e}")
            return transformed(image, upload=device is not None)

    def transformed(image, *, upload: bool = False):
        try:  # the upload too: a device out of memory on one large image is that image's alone
            return finish(image.to(device, non_blocking=True) if upload else image)
        except Exception as e:  # a failure here is this image's alone
            return PreprocessError(f"preprocessing the {image.shape[-1]}x{image.shape[-2]} image failed: {e}")

    results: list = [None] * len(payloads)
    batched: list[int] = []
    orientation: dict[int, int] = {}  # the batch decoder returns JPEGs as stored: turned upright here
    if jpeg_batch_decoder is not None:
        for i, data in enumerate(payloads):
            # nvjpeg decodes a truncated JPEG without an error (the missing rows come back black): only
            # complete JPEGs (ending with the EOI marker) go to the batch decoder, the rest to the CPU.
            if bytes(data[:3]) == JPEG_MAGIC and bytes(data[-2:]) == JPEG_EOI:
                try:
                    orientation[i] = (infos[i] if infos else probe(data, **limits)).orientation
                    batched.append(i)
                except ImageError as e:
                    results[i] = e
        decoded = decode_batch({i: payloads[i] for i in batched}, orientation, jpeg_batch_decoder,
                               lambda images: transform_by_shape(images, transform, one=transformed))
        for i, result in decoded.items():
            results[i] = result
    rest = [i for i in range(len(payloads)) if results[i] is None]
    mapper = pool.map if pool is not None else map
    for i, result in zip(rest, mapper(one, [(payloads[i], infos[i] if infos else None) for i in rest])):
        results[i] = result
    return results
