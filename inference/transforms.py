"""The evaluation transform: THE resize/crop of the project, on uint8 ``(C, H, W)`` tensors.

:class:`EvalPreset` is called by training's evaluation, export's verification and the TorchServe
handler alike, so served and offline pixels are identical. It only resizes and crops; conversion to
float and mean/std normalization happen inside the exported graph (``export/wrappers.py``) or, for
the eager model, in :func:`normalize`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import InterpolationMode, v2


class EvalPreset:
    """Resize the shorter side to ``resize_size`` (antialiased), then center-crop ``crop_size``: one
    ``v2.Compose`` built once, as torchvision's reference presets do (``transform``; training's augmentation
    without randomness takes its steps, ``training.presets.TrainPreset``)."""

    def __init__(self, *, crop_size: int, resize_size: int | None = None,
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR, antialias: bool = True):
        self.crop_size = int(crop_size)
        self.resize_size = int(resize_size or crop_size)
        self.interpolation = interpolation
        self.antialias = antialias
        self.transform = v2.Compose([v2.Resize(self.resize_size, interpolation=interpolation, antialias=antialias),
                                     v2.CenterCrop(self.crop_size)])

    @property
    def min_decode_side(self) -> int:
        """The shorter side this transform needs from the decoder (``inference.images.decode_rgb``'s
        ``min_side``): any image at least this large comes out the same size, so a JPEG may be decoded
        reduced down to it."""
        return self.resize_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: uint8 ``(..., C, H, W)``; images of one shape may be batched."""
        return self.transform(image)

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Transform images of any sizes into one ``(N, C, crop, crop)`` uint8 batch.

        Images that share a shape are resized together in one call; the output keeps input order.
        """
        if not images:
            raise ValueError("EvalPreset.batch needs at least one image")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(i)
        out = torch.empty((len(images), images[0].shape[0], self.crop_size, self.crop_size),
                          dtype=images[0].dtype, device=images[0].device)
        for idx in groups.values():
            out[idx] = self(torch.stack([images[i] for i in idx]))
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, resize_size={self.resize_size}, "
                f"interpolation={self.interpolation.value}, antialias={self.antialias})")


# The most pixels that transform_by_shape resizes in one call: on a GPU the resize works on a float32 copy,
# so 48 MP is ~0.6 GB of device memory at once (256 images of 500x375, 3 of 12 MP).
GROUP_PIXELS = 48_000_000


def transform_by_shape(images: list[torch.Tensor], transform, *, one: Callable) -> list:
    """``images`` (decoded already, e.g. by nvjpeg on a GPU) through ``transform``: the ones of one shape
    together, at most :data:`GROUP_PIXELS` per call, when ``transform`` has a ``batch`` method
    (:class:`EvalPreset`); else, or when a group's call fails (e.g. out of memory), image by image through
    ``one`` (which fails only its own image). Results in input order."""
    if len(images) < 2 or not hasattr(transform, "batch"):
        return [one(image) for image in images]
    out: list = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    for shape, members in groups.items():
        step = max(1, GROUP_PIXELS // (shape[-1] * shape[-2]))
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            if len(chunk) == 1:
                out[chunk[0]] = one(images[chunk[0]])
                continue
            try:
                canvases = list(transform.batch([images[k] for k in chunk]))
            except Exception:  # the group's call failed: image by image, so that only a bad one fails
                canvases = [one(images[k]) for k in chunk]
            for k, canvas in zip(chunk, canvases):
                out[k] = canvas
    return out


def normalize(images: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float, ``/255`` then ``(x - mean) / std``: what the exported graph does."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
