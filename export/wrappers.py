"""Graphs that take raw uint8 images: normalization, TTA and top-k live inside the exported model.

* :class:`FusedNormalization` -- uint8 -> logits, ``/255 -mean /std`` as one per-channel affine.
* :class:`InGraphTTA` -- uint8 -> mean-softmax probabilities over flip (or five-crop + flip) views,
  all views in one batch: TTA that any ONNX runtime runs without handler code.
* :class:`InGraphTopK` -- probabilities -> ``(top-k probabilities, top-k indices)``.

The first convolution is NOT merged with the normalization affine: with zero padding the border
pixels would see ``mean`` instead of 0 and the result would change. The affine stays a separate
(cheap) multiply-add; BatchNorm is folded into the convolutions by the TorchScript freezer and the
ONNX exporter.
"""
from __future__ import annotations

import torch
from torch import nn

from inference.tta import GRAPH_TTA_MODES, aggregate, cuts_from_resize, tta_views

DEFAULT_GRAPH_TTA = "flip"  # the onnx-tta graph's views
DEFAULT_GRAPH_TOPK = 5      # the onnx-topk graph's k


class FusedNormalization(nn.Module):
    """uint8 ``(N, 3, H, W)`` -> logits. Computes ``model((x / 255 - mean) / std)``.

    ``/255``, ``-mean`` and ``/std`` are folded into one per-channel ``x * scale + shift``
    (``scale = 1 / (255 std)``, ``shift = -mean / std``), computed in float64 then stored as float32.
    ``dtype`` runs the model in another precision (bf16/fp16) with float32 logits out.
    """

    def __init__(self, model: nn.Module, *, mean: tuple[float, ...], std: tuple[float, ...],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).float())
        self.register_buffer("shift", (-mean_t / std_t).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.scale + self.shift
        return self.model(x.to(self.dtype)).float()


class InGraphTTA(nn.Module):
    """uint8 -> mean softmax over TTA views, every view in ONE forward of ``base`` (uint8 -> logits).

    The views are ``inference.tta.tta_views``, the handler's own: ``flip`` takes input at the crop size;
    ``five_crop`` (5 views) and ``ten_crop`` (the five and their flips) take the resize-size square.
    """

    def __init__(self, base: nn.Module, *, mode: str = DEFAULT_GRAPH_TTA, crop_size: int | None = None):
        super().__init__()
        if mode not in GRAPH_TTA_MODES:
            raise ValueError(f"in-graph TTA mode must be one of {GRAPH_TTA_MODES}, got {mode!r}")
        if cuts_from_resize(mode) and not crop_size:
            raise ValueError(f"{mode} needs crop_size")
        self.base = base
        self.mode = mode
        self.crop_size = crop_size or 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = tta_views(images, self.mode, crop_size=self.crop_size or None)
        return aggregate(self.base(views), images.shape[0], how="softmax")  # the handler's own aggregation


class InGraphTopK(nn.Module):
    """``base`` (uint8 -> logits, or probabilities when ``base_gives_probs``) -> ``(values[k], indices[k])``."""

    def __init__(self, base: nn.Module, *, k: int, base_gives_probs: bool = False):
        super().__init__()
        self.base = base
        self.k = k
        self.base_gives_probs = base_gives_probs

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.base(images)
        probs = out if self.base_gives_probs else out.softmax(-1)
        values, indices = probs.topk(self.k, dim=-1)
        return values, indices
