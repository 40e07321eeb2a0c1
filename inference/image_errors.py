"""The errors an image can raise, each with the HTTP status and error name that its request is answered with."""
from __future__ import annotations


class ImageError(ValueError):
    """A request's bytes are not an acceptable image: ``status`` and ``error`` as a ``RequestError`` has them."""

    status = 400
    error = "bad image"


class ImageTooLargeError(ImageError):
    status, error = 413, "image too large"


class UnsupportedFormatError(ImageError):
    status = 415
    error = "unsupported image format"


class PreprocessError(ImageError):
    """The image decoded, but the transform after it failed (e.g. out of memory): a server error."""

    status = 500
    error = "preprocess failed"


class StructureError(ImageError):
    """More segments than any real image has (``inference.containers``, ``inference.tiff_ifds``): a 400 that
    names the count."""

    @classmethod
    def too_many(cls, kind: str, what: str, limit: int, size: int) -> "StructureError":
        return cls(f"{kind} of {size} bytes with more than {limit} {what}: refused (real images have far fewer; "
                   "reading them would hold the worker)")


def in_request(error: ImageError, k: int, count: int, *, multi: bool) -> ImageError:
    """The error of image ``k`` of a request of ``count``, as that request's answer: a request of several
    images fails whole, and the message says which image; a single image's error is its own."""
    return type(error)(f"image {k} of {count}: {error}") if multi else error
