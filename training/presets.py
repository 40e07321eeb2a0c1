"""Image presets in the style of torchvision's ``references/classification/presets.py``.

:class:`EvalPreset` is THE evaluation transform of the project: training's evaluation, export's
verification and the TorchServe handler all call it, on uint8 ``(C, H, W)`` tensors. It only
resizes and crops; conversion to float and mean/std normalization happen inside the exported graph
(see ``export/wrappers.py``) or, for the eager model, in :func:`normalize`.

This module depends on torch/torchvision only and uses no relative imports: it is copied flat into
every ``.mar`` archive next to the handler.
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F


class EvalPreset:
    """Resize the shorter side to ``resize_size`` (antialiased), then center-crop ``crop_size``."""

    def __init__(self, *, crop_size: int, resize_size: int | None = None,
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR, antialias: bool = True):
        self.crop_size = int(crop_size)
        self.resize_size = int(resize_size or crop_size)
        self.interpolation = interpolation
        self.antialias = antialias

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: uint8 ``(..., C, H, W)``; images of one shape may be batched."""
        image = F.resize(image, [self.resize_size], interpolation=self.interpolation, antialias=self.antialias)
        return F.center_crop(image, [self.crop_size, self.crop_size])

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


class TrainPreset:
    """Training augmentation on one uint8 ``(C, H, W)`` tensor (the DataLoader batches); the output is
    uint8 ``(C, crop_size, crop_size)``, the size and dtype of :class:`EvalPreset`'s.

    ``mode`` is the geometric part:

    * ``"pad_crop"`` (default, small images such as CIFAR): resize as :class:`EvalPreset`, then
      reflect-pad by ``padding`` pixels and randomly crop back to ``crop_size``;
    * ``"random_resized_crop"`` (large images): ``RandomResizedCrop(crop_size, scale, ratio)`` of the
      input. With a cached data set, cache at a larger size than ``crop_size`` (or not at all), since
      the crop can only zoom into what the cache kept;
    * ``"none"``: just :class:`EvalPreset`.

    Then, each off at its default: horizontal flip (``hflip_prob``), ``RandomRotation(rotation)``
    degrees, ``RandomAffine`` with translate ``affine`` (fraction of the size) and scale
    ``1 +- affine``, ``ColorJitter`` with brightness/contrast/saturation ``color_jitter``, an
    ``auto_augment`` policy (``"randaugment"`` with ``ra_magnitude``, or ``"trivialaugment"``), and
    ``RandomErasing`` with probability ``random_erase`` (erased pixels become 0; v2's RandomErasing
    writes a constant into a slice, which works on uint8 tensors). Uncovered pixels of rotation and
    affine are filled with 0. ``repr()`` lists the active steps.
    """

    MODES = ("pad_crop", "random_resized_crop", "none")
    AUTO_AUGMENT = (None, "randaugment", "trivialaugment")

    def __init__(self, *, crop_size: int, resize_size: int | None = None, mode: str = "pad_crop",
                 padding: int = 4, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip_prob: float = 0.5, rotation: float = 0.0,
                 color_jitter: float = 0.0, affine: float = 0.0, auto_augment: str | None = None,
                 ra_magnitude: int = 9, random_erase: float = 0.0,
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        if mode not in self.MODES:
            raise ValueError(f"TrainPreset mode must be one of {self.MODES}, not {mode!r}")
        if auto_augment not in self.AUTO_AUGMENT:
            raise ValueError(f"TrainPreset auto_augment must be one of {self.AUTO_AUGMENT}, not {auto_augment!r}")
        for name, value in (("hflip_prob", hflip_prob), ("random_erase", random_erase)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TrainPreset {name} is a probability in [0, 1], not {value}")
        if not 0.0 <= affine < 1.0:
            raise ValueError(f"TrainPreset affine strength must be in [0, 1), not {affine}")
        if rotation < 0 or color_jitter < 0 or padding < 0:
            raise ValueError("TrainPreset rotation, color_jitter and padding must be >= 0")
        self.eval = EvalPreset(crop_size=crop_size, resize_size=resize_size, interpolation=interpolation)
        self.crop_size = self.eval.crop_size
        self.mode = mode
        self.padding = int(padding)
        self.hflip_prob = float(hflip_prob)
        self.rotation = float(rotation)
        self.color_jitter = float(color_jitter)
        self.affine = float(affine)
        self.auto_augment = auto_augment
        self.random_erase = float(random_erase)
        self.steps: list = []  # after the geometric crop and the flip
        if self.rotation:
            self.steps.append(v2.RandomRotation(self.rotation, interpolation=interpolation, fill=0))
        if self.affine:
            self.steps.append(v2.RandomAffine(degrees=0, translate=(self.affine, self.affine),
                                              scale=(1 - self.affine, 1 + self.affine),
                                              interpolation=interpolation, fill=0))
        if self.color_jitter:
            self.steps.append(v2.ColorJitter(brightness=self.color_jitter, contrast=self.color_jitter,
                                             saturation=self.color_jitter))
        if auto_augment == "randaugment":
            self.steps.append(v2.RandAugment(magnitude=ra_magnitude, interpolation=interpolation))
        elif auto_augment == "trivialaugment":
            self.steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
        if self.random_erase:
            self.steps.append(v2.RandomErasing(p=self.random_erase, value=0))
        self.random_resized_crop = None
        if mode == "random_resized_crop":
            self.random_resized_crop = v2.RandomResizedCrop(self.crop_size, scale=tuple(scale), ratio=tuple(ratio),
                                                            interpolation=interpolation, antialias=True)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.random_resized_crop is not None:
            image = self.random_resized_crop(image)
        else:
            image = self.eval(image)
            if self.mode == "pad_crop" and self.padding:
                size = image.shape[-1]
                image = F.pad(image, [self.padding], padding_mode="reflect")
                top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
                image = F.crop(image, top, left, size, size)
        if self.hflip_prob and torch.rand(()) < self.hflip_prob:
            image = F.horizontal_flip(image)
        for step in self.steps:
            image = step(image)
        return image

    def describe(self) -> list[str]:
        """The active steps, in order, as short strings."""
        if self.random_resized_crop is not None:
            rrc = self.random_resized_crop
            first = [f"RandomResizedCrop({self.crop_size}, scale={tuple(rrc.scale)}, "
                     f"ratio={tuple(round(r, 4) for r in rrc.ratio)})"]
        else:
            first = [repr(self.eval)]
            if self.mode == "pad_crop" and self.padding:
                first.append(f"PadRandomCrop(padding={self.padding}, padding_mode=reflect)")
        if self.hflip_prob:
            first.append(f"RandomHorizontalFlip(p={self.hflip_prob})")
        return first + [" ".join(repr(step).split()) for step in self.steps]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n" + "".join(f"    {s},\n" for s in self.describe()) + ")"


def normalize(images: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float, ``/255`` then ``(x - mean) / std``: what the exported graph does."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
