"""Admission control: what one request and one batch may cost in decoded pixels, decided from the
images' headers before any pixel is decoded.

An image costs the pixels it will be decoded to (``ImageInfo.decoded_pixels``): a JPEG that the CPU
decodes reduced in the DCT domain (``min_side``: the evaluation transform's) costs its reduced size,
e.g. 504x378 for a 12 MP phone photo going to a 256 resize; with ``min_side=None`` (the GPU's nvjpeg
path, which decodes JPEGs at full size) every image costs its full size.

A request whose images add up to more than ``max_request_pixels`` is refused with 413. The batch's
requests are then admitted in order while their total stays within ``max_batch_pixels``; the rest get
503 with a reason (retry later), never the whole batch. The first request that fits its own budget
is always admitted, so a batch always makes progress; as the settings refuse a ``max_request_pixels``
above a configured ``max_batch_pixels`` (and the defaults keep it below), that first request fits the
batch's budget too: the budget is a hard bound. Together with the per-image bounds of
``inference.images.probe`` this caps what a worker holds decoded at once, whatever the bodies' sizes
(a PNG of a few KB can decode to hundreds of MB).

The batch budget, unless configured, follows the decoder (:func:`batch_pixel_budget`): 128 MP where JPEGs
are decoded reduced (the CPU: over 600 phone photos), ``batch_size`` x 24 MP where nvjpeg holds every JPEG
of the batch at full size (a GPU), so that a full batch of 12-20 MP phone photos is admitted there too.
"""
from __future__ import annotations

from inference.image_errors import ImageError, in_request
from inference.images import PYTHON_DECODE_WEIGHT, ImageInfo, probe
from inference.requests import Request, RequestError

DEFAULT_MAX_REQUEST_PIXELS = 64_000_000   # e.g. five 12 MP photos in one request
DEFAULT_MAX_BATCH_PIXELS = 128_000_000    # ~384 MB of RGB at full resolution, before the resize
FULL_SIZE_PIXELS_PER_SLOT = 24_000_000    # a batch slot's share when JPEGs decode at full size (GPU): 72 MB


def probe_requests(requests: dict[int, Request], **limits) -> tuple[dict[int, list[ImageInfo]], dict[int, ImageError]]:
    """Every image's header of every request (:func:`inference.images.probe` with ``limits``): the infos of the
    requests whose images all pass, and for each other request the error of its first refused image."""
    infos, errors = {}, {}
    for i, req in requests.items():
        found = []
        for k, data in enumerate(req.images):
            try:
                found.append(probe(data, **limits))
            except ImageError as e:
                errors[i] = in_request(e, k, len(req.images), multi=req.multi)
                break
        else:
            infos[i] = found
    return infos, errors


def batch_pixel_budget(configured: int | None, *, batch_size: int, full_size: bool) -> int:
    """The ``max_batch_pixels`` a worker uses: ``configured`` when set; else :data:`DEFAULT_MAX_BATCH_PIXELS`,
    or, where JPEGs are decoded at full size (``full_size``: nvjpeg on a GPU), ``batch_size`` x
    :data:`FULL_SIZE_PIXELS_PER_SLOT` when that is more (e.g. 384 MP, 1.2 GB of GPU memory, for a batch of 16)."""
    if configured is not None:
        return configured
    return max(DEFAULT_MAX_BATCH_PIXELS, batch_size * FULL_SIZE_PIXELS_PER_SLOT) if full_size \
        else DEFAULT_MAX_BATCH_PIXELS


def admit(requests: dict[int, list[ImageInfo]], *, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
          max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS, min_side: int | None = None) -> dict[int, RequestError]:
    """``{request index: its images' headers}`` -> the errors of the requests that are not admitted;
    ``min_side``: the decoder's (see the module docstring)."""
    errors: dict[int, RequestError] = {}
    total, admitted = 0, 0
    for i in sorted(requests):
        pixels = sum(info.decoded_pixels(min_side) for info in requests[i])
        if pixels > max_request_pixels:
            rle = f" (RLE-compressed BMPs count {PYTHON_DECODE_WEIGHT}x their pixels)" if any(x.python_decoded for x in requests[i]) else ""
            errors[i] = RequestError(f"the request's {len(requests[i])} images decode to {pixels} pixels; the limit "
                                     f"per request is {max_request_pixels}{rle}", status=413, error="request too large")
        elif admitted and total + pixels > max_batch_pixels:
            errors[i] = RequestError(f"the worker's budget of {max_batch_pixels} decoded pixels per batch is taken by "
                                     f"other requests (this one needs {pixels}): retry", status=503,
                                     error="busy")
        else:
            total += pixels
            admitted += 1
    return errors
