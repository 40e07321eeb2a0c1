"""Test-time augmentation as one batched forward. Shared by offline evaluation, export's in-graph
TTA and the handler.

Views are built from a square uint8 "canvas" batch ``(N, C, R, R)`` (see :func:`canvas_preset`) and
returned view-major ``(V * N, C, crop, crop)`` with the plain center view FIRST, so that adaptive TTA
can run view 0 alone and the other views only where needed:

* ``none``       -- the center crop (the evaluation view)
* ``flip``       -- center + its horizontal flip
* ``five_crop``  -- center, top-left, top-right, bottom-left, bottom-right (canvas at the resize size)
* ``ten_crop``   -- the five crops and their flips
* ``multi_scale``-- for each scale ``s``: the center ``round(crop * s)`` square resized to ``crop``
  (``s > 1`` sees more context, ``s < 1`` zooms in); canvas at the resize size
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms.v2 import functional as F

from inference.transforms import EvalPreset

TTA_MODES = ("none", "flip", "five_crop", "ten_crop", "multi_scale")
GRAPH_TTA_MODES = ("flip", "five_crop", "ten_crop")  # what an exported graph can hold (export.wrappers.InGraphTTA)


def cuts_from_resize(mode: str) -> bool:
    """Whether ``mode`` cuts its views from the resize-size square (five_crop, ten_crop, multi_scale) rather
    than from the crop itself (none, flip): what the canvas, an in-graph TTA's input and its reference are."""
    return mode not in ("none", "flip")
DEFAULT_SCALES = (1.0, 1.15, 0.87)
AGGREGATES = ("softmax", "logits")
ADAPTIVE_METRICS = ("confidence", "margin")  # top-1 probability, or top-1 minus top-2
DEFAULT_AGGREGATE, DEFAULT_ADAPTIVE_METRIC, DEFAULT_ADAPTIVE_THRESHOLD = "softmax", "confidence", 0.9


def canvas_preset(mode: str, *, crop_size: int, resize_size: int | None = None) -> EvalPreset:
    """The eval transform whose output the views are cut from: the crop itself for ``none``/``flip``
    (exactly the offline evaluation transform), the center square at the resize size otherwise."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {TTA_MODES}")
    if not cuts_from_resize(mode):
        return EvalPreset(crop_size=crop_size, resize_size=resize_size)
    size = resize_size or crop_size
    return EvalPreset(crop_size=size, resize_size=size)


def num_views(mode: str, scales: Sequence[float] = DEFAULT_SCALES) -> int:
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {TTA_MODES}")
    return {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10, "multi_scale": len(scales)}[mode]


def _center(canvas: torch.Tensor, crop: int) -> torch.Tensor:
    """torchvision's center crop, with plain ints so the ONNX tracer sees constant slices."""
    h, w = int(canvas.shape[-2]), int(canvas.shape[-1])
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return canvas[..., top:top + crop, left:left + crop]


def tta_views(canvas: torch.Tensor, mode: str, *, crop_size: int | None = None,
              scales: Sequence[float] = DEFAULT_SCALES) -> torch.Tensor:
    """``(N, C, R, R)`` -> ``(V * N, C, crop, crop)``, view-major, center view first."""
    crop = int(crop_size or canvas.shape[-1])
    if not cuts_from_resize(mode):
        center = _center(canvas, crop)
        return center if mode == "none" else torch.cat([center, center.flip(-1)])
    if mode in ("five_crop", "ten_crop"):  # torchvision's five_crop, center first
        h, w = int(canvas.shape[-2]), int(canvas.shape[-1])
        views = torch.cat([_center(canvas, crop), canvas[..., :crop, :crop], canvas[..., :crop, w - crop:],
                           canvas[..., h - crop:, :crop], canvas[..., h - crop:, w - crop:]])
        return views if mode == "five_crop" else torch.cat([views, views.flip(-1)])
    if mode == "multi_scale":
        size = canvas.shape[-1]
        out = []
        for s in scales:
            side = min(size, max(1, round(crop * s)))
            view = _center(canvas, side)
            out.append(view if side == crop else F.resize(view, [crop, crop], antialias=True))
        return torch.cat(out)
    raise ValueError(f"unknown TTA mode {mode!r}; choose one of {TTA_MODES}")


def aggregate(logits: torch.Tensor, n: int, *, how: str = DEFAULT_AGGREGATE) -> torch.Tensor:
    """``(V * N, K)`` -> ``(N, K)`` probabilities: mean softmax over views, or softmax of mean logits."""
    per_view = logits.float().view(-1, n, logits.shape[-1])
    if how == "softmax":
        return per_view.softmax(-1).mean(0)
    if how == "logits":
        return per_view.mean(0).softmax(-1)
    raise ValueError(f"unknown aggregation {how!r}; choose one of {AGGREGATES}")


def predict_proba(forward: Callable[[torch.Tensor], torch.Tensor], canvas: torch.Tensor, mode: str, *,
                  crop_size: int | None = None, scales: Sequence[float] = DEFAULT_SCALES,
                  how: str = DEFAULT_AGGREGATE) -> torch.Tensor:
    """Run ``forward`` ONCE over every view of every image; return ``(N, K)`` probabilities."""
    views = tta_views(canvas, mode, crop_size=crop_size, scales=scales)
    return aggregate(forward(views), canvas.shape[0], how=how)


def uncertain(probs: torch.Tensor, *, metric: str = DEFAULT_ADAPTIVE_METRIC, threshold: float = DEFAULT_ADAPTIVE_THRESHOLD) -> torch.Tensor:
    """Boolean mask of rows whose top-1 confidence (or top-1 minus top-2 margin) is below ``threshold``."""
    if metric not in ADAPTIVE_METRICS:
        raise ValueError(f"adaptive TTA metric must be confidence or margin, got {metric!r}")
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    score = top[:, 0] if metric == "confidence" else top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)
    return score < threshold


def adaptive_predict_proba(forward: Callable[[torch.Tensor], torch.Tensor], canvas: torch.Tensor, mode: str, *,
                           crop_size: int | None = None, scales: Sequence[float] = DEFAULT_SCALES,
                           how: str = DEFAULT_AGGREGATE, metric: str = DEFAULT_ADAPTIVE_METRIC,
                           threshold: float = DEFAULT_ADAPTIVE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain forward for every image; the TTA views only for the uncertain ones (one more forward).

    Returns ``(probabilities (N, K), tta_applied (N,) bool)``. Where TTA is applied the result equals
    :func:`predict_proba` over all views (the first view's logits are reused). The other views are built
    for the uncertain images alone (a multi-scale resize of every image was work thrown away).
    """
    n = canvas.shape[0]
    first = (tta_views(canvas, mode, crop_size=crop_size, scales=scales[:1]) if mode == "multi_scale"
             else tta_views(canvas, "none", crop_size=crop_size))  # each mode's first view (tta_views' order)
    plain_logits = forward(first).float()
    probs = plain_logits.softmax(-1)
    mask = uncertain(probs, metric=metric, threshold=threshold)
    if mode == "none" or not mask.any():
        return probs, torch.zeros(n, dtype=torch.bool)
    idx = mask.nonzero().squeeze(1)
    m = len(idx)
    extra = tta_views(canvas[idx.to(canvas.device)], mode, crop_size=crop_size, scales=scales)[m:]  # view-major
    all_logits = torch.cat([plain_logits[idx.to(plain_logits.device)], forward(extra).float()])
    probs = probs.clone()
    probs[idx.to(probs.device)] = aggregate(all_logits, m, how=how).to(probs.device)
    return probs, mask.cpu()
