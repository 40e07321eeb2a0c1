"""Training augmentation, in the style of torchvision's ``references/classification/presets.py``:
one ``v2.Compose`` of torchvision's own transforms, built once from keyword-only arguments.

The evaluation transform is :class:`inference.transforms.EvalPreset` (the inference core); the
training preset starts with the same resize and crop so that both produce the same size and dtype.
"""
from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode, v2

from inference.transforms import EvalPreset


class TrainPreset:
    """Training augmentation on one uint8 ``(C, H, W)`` tensor (the DataLoader batches); the output is
    uint8 ``(C, crop_size, crop_size)``, the size and dtype of the evaluation transform's.

    ``mode`` is the geometric part:

    * ``"pad_crop"`` (default, small images such as CIFAR): ``Resize(resize_size)`` and
      ``CenterCrop(crop_size)`` (the evaluation transform), then
      ``RandomCrop(crop_size, padding, padding_mode="reflect")``;
    * ``"random_resized_crop"`` (large images): ``RandomResizedCrop(crop_size, scale, ratio)`` of the
      input. With a cached data set, cache at a larger size than ``crop_size`` (or not at all), since
      the crop can only zoom into what the cache kept;
    * ``"none"``: just the evaluation resize and crop.

    ``cached``: the images come already through the evaluation resize and crop (the in-memory cache of
    ``train --cache`` keeps them so): ``pad_crop`` and ``none`` do not apply them a second time (which
    magnified every training image by ``resize_size / crop_size`` against evaluation and serving).

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
                 ra_magnitude: int = 9, random_erase: float = 0.0, cached: bool = False,
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
        if cached and mode == "random_resized_crop":
            raise ValueError("TrainPreset: random_resized_crop cannot crop cached images (the cache keeps only the "
                             "evaluation center crop)")
        steps: list = []
        if mode == "random_resized_crop":
            steps.append(v2.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio),
                                              interpolation=interpolation, antialias=True))
        else:  # the evaluation transform's own resize and crop, unless the cache applied them already
            evaluation = EvalPreset(crop_size=crop_size, resize_size=resize_size, interpolation=interpolation)
            if not cached:
                steps += evaluation.transform.transforms
            if mode == "pad_crop" and padding:
                steps.append(v2.RandomCrop(crop_size, padding=padding, padding_mode="reflect"))
        if hflip_prob:
            steps.append(v2.RandomHorizontalFlip(hflip_prob))
        if rotation:
            steps.append(v2.RandomRotation(rotation, interpolation=interpolation, fill=0))
        if affine:
            steps.append(v2.RandomAffine(degrees=0, translate=(affine, affine), scale=(1 - affine, 1 + affine),
                                         interpolation=interpolation, fill=0))
        if color_jitter:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
        if auto_augment == "randaugment":
            steps.append(v2.RandAugment(magnitude=ra_magnitude, interpolation=interpolation))
        elif auto_augment == "trivialaugment":
            steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
        if random_erase:
            steps.append(v2.RandomErasing(p=random_erase, value=0))
        self.crop_size = int(crop_size)
        self.transform = v2.Compose(steps or [v2.Identity()])  # cached, no augmentation: as cached
        if mode == "random_resized_crop":  # the narrowest crop it can draw: a scale[0] share, the most oblong ratio
            share = scale[0] * min(ratio[0], 1 / ratio[1], 1.0)
            self._min_decode_side = math.ceil(self.crop_size / math.sqrt(share)) if share > 0 else None
        else:
            self._min_decode_side = evaluation.min_decode_side

    @property
    def min_decode_side(self) -> int | None:
        """The shorter side this transform needs from the decoder (``inference.images.decode_rgb``'s ``min_side``),
        so that a JPEG decoded reduced in the DCT domain down to it is never upsampled where the full-size one
        would not be. ``random_resized_crop``: its narrowest crop, ``scale[0]`` of the area at the most oblong
        ``ratio``, has a shorter side of ``sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))`` times a square image's
        side; that must still be ``crop_size`` (224 / sqrt(0.08 * 3/4) = 915 px: a 12 MP phone photo decodes at 1/2,
        a quarter of its pixels; None, full size, for a ``scale[0]`` of 0). Otherwise the evaluation resize's size,
        as :class:`EvalPreset`."""
        return self._min_decode_side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image)

    def describe(self) -> list[str]:
        """The steps, in order, as one-line reprs of the torchvision transforms."""
        return [" ".join(repr(step).split()) for step in self.transform.transforms]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n" + "".join(f"    {s},\n" for s in self.describe()) + ")"
