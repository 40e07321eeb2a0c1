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

Each mode is one :class:`TTAMode` of :data:`MODES`; everything else reads it from there: the view count, the
canvas, adaptive TTA's first view and the degenerate-configuration check at each call, the choice lists of
the settings and CLIs (:data:`TTA_MODES`, :data:`GRAPH_TTA_MODES`) at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torchvision.transforms.v2 import functional as F

from inference.transforms import EvalPreset

DEFAULT_SCALES = (1.0, 1.15, 0.87)
AGGREGATES = ("softmax", "logits")
ADAPTIVE_METRICS = ("confidence", "margin")  # top-1 probability, or top-1 minus top-2
DEFAULT_AGGREGATE, DEFAULT_ADAPTIVE_METRIC, DEFAULT_ADAPTIVE_THRESHOLD = "softmax", "confidence", 0.9


def _center(canvas: torch.Tensor, crop: int) -> torch.Tensor:
    """torchvision's center crop, with plain ints so the ONNX tracer sees constant slices."""
    h, w = int(canvas.shape[-2]), int(canvas.shape[-1])
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return canvas[..., top:top + crop, left:left + crop]


def _with_flips(views: torch.Tensor) -> torch.Tensor:
    return torch.cat([views, views.flip(-1)])


def _five_crops(canvas: torch.Tensor, crop: int) -> torch.Tensor:
    """torchvision's five_crop, center first."""
    h, w = int(canvas.shape[-2]), int(canvas.shape[-1])
    return torch.cat([_center(canvas, crop), canvas[..., :crop, :crop], canvas[..., :crop, w - crop:],
                      canvas[..., h - crop:, :crop], canvas[..., h - crop:, w - crop:]])


def scale_sides(scales: Sequence[float], *, crop: int, size: int) -> list[int]:
    """The side of the center square each multi_scale view cuts from a ``size`` canvas: ``round(crop * s)``,
    at most the whole canvas (so every scale above ``size / crop`` is the same view)."""
    return [min(size, max(1, round(crop * s))) for s in scales]


def view_problem(mode: str, *, crop: int, size: int, scales: Sequence[float] = DEFAULT_SCALES) -> str | None:
    """Why ``mode``'s views of a ``size`` canvas cropped to ``crop`` would repeat one view, or None: five_crop/ten_crop
    (and multi_scale with no scale below 1) cut their views from the resize_size square, which must then be larger
    than the crop; two multi_scale scales must not cut the same square. The handler's settings and offline
    ``evaluate``/``predict`` refuse what this names (each adds its own remedy)."""
    if mode_of(mode).needs_margin(scales) and size <= crop:
        return (f"tta {mode} cuts its views from the resize_size square, and resize_size {size} is input_size "
                f"{crop}: every view would be the same image")
    sides = scale_sides(scales, crop=crop, size=size) if mode == "multi_scale" else []
    if len(set(sides)) < len(sides):
        return (f"tta_scales {', '.join(map(str, scales))} cut squares of sides {sides} from the resize_size {size} "
                f"square (a scale above {size / crop:.3g} is the whole square): one view would count twice")
    return None


def _scaled(canvas: torch.Tensor, crop: int, scales: Sequence[float]) -> torch.Tensor:
    out = []
    for side in scale_sides(scales, crop=crop, size=int(canvas.shape[-1])):
        view = _center(canvas, side)
        out.append(view if side == crop else F.resize(view, [crop, crop], antialias=True))
    return torch.cat(out)


@dataclass(frozen=True)
class TTAMode:
    """One TTA mode: its views of a canvas batch (``views(canvas, crop, scales)``, view-major, the first view
    alone by ``first``), how many per image, whether it cuts them from the resize-size square, whether an
    exported graph can hold it (fixed views, no resize), and whether its views are copies of one view unless
    the resize square is larger than the crop (``needs_margin(scales)``)."""
    name: str
    views: Callable[[torch.Tensor, int, Sequence[float]], torch.Tensor]
    count: Callable[[Sequence[float]], int]
    cuts_from_resize: bool
    in_graph: bool
    needs_margin: Callable[[Sequence[float]], bool] = lambda scales: False
    first: Callable[[torch.Tensor, int, Sequence[float]], torch.Tensor] = \
        lambda canvas, crop, scales: _center(canvas, crop)


MODES: dict[str, TTAMode] = {m.name: m for m in (
    TTAMode("none", lambda c, crop, s: _center(c, crop), lambda s: 1, cuts_from_resize=False, in_graph=False),
    TTAMode("flip", lambda c, crop, s: _with_flips(_center(c, crop)), lambda s: 2, cuts_from_resize=False,
            in_graph=True),
    TTAMode("five_crop", lambda c, crop, s: _five_crops(c, crop), lambda s: 5, cuts_from_resize=True,
            in_graph=True, needs_margin=lambda s: True),
    TTAMode("ten_crop", lambda c, crop, s: _with_flips(_five_crops(c, crop)), lambda s: 10, cuts_from_resize=True,
            in_graph=True, needs_margin=lambda s: True),
    TTAMode("multi_scale", _scaled, len, cuts_from_resize=True, in_graph=False,
            needs_margin=lambda s: min(s) >= 1, first=lambda c, crop, s: _scaled(c, crop, s[:1])),
)}
TTA_MODES = tuple(MODES)
GRAPH_TTA_MODES = tuple(m.name for m in MODES.values() if m.in_graph)  # export.wrappers.InGraphTTA


def mode_of(mode: str) -> TTAMode:
    """The registered TTA mode called ``mode``; ValueError naming the choices otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {TTA_MODES}")
    return MODES[mode]


def cuts_from_resize(mode: str) -> bool:
    """Whether ``mode`` cuts its views from the resize-size square (five_crop, ten_crop, multi_scale) rather
    than from the crop itself (none, flip): what the canvas, an in-graph TTA's input and its reference are."""
    return mode_of(mode).cuts_from_resize


def canvas_preset(mode: str, *, crop_size: int, resize_size: int | None = None) -> EvalPreset:
    """The eval transform whose output the views are cut from: the crop itself for ``none``/``flip``
    (exactly the offline evaluation transform), the center square at the resize size otherwise."""
    if not cuts_from_resize(mode):
        return EvalPreset(crop_size=crop_size, resize_size=resize_size)
    size = resize_size or crop_size
    return EvalPreset(crop_size=size, resize_size=size)


def num_views(mode: str, scales: Sequence[float] = DEFAULT_SCALES) -> int:
    return mode_of(mode).count(scales)


def tta_views(canvas: torch.Tensor, mode: str, *, crop_size: int | None = None,
              scales: Sequence[float] = DEFAULT_SCALES) -> torch.Tensor:
    """``(N, C, R, R)`` -> ``(V * N, C, crop, crop)``, view-major, center view first."""
    return mode_of(mode).views(canvas, int(crop_size or canvas.shape[-1]), scales)


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


def uncertain(probs: torch.Tensor, *, metric: str = DEFAULT_ADAPTIVE_METRIC,
              threshold: float = DEFAULT_ADAPTIVE_THRESHOLD) -> torch.Tensor:
    """Boolean mask of rows whose top-1 confidence (or top-1 minus top-2 margin) is below ``threshold``, or is
    not a number (NaN scores of an overflowed forward are no certainty)."""
    if metric not in ADAPTIVE_METRICS:
        raise ValueError(f"adaptive TTA metric must be confidence or margin, got {metric!r}")
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    score = top[:, 0] if metric == "confidence" else top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)
    return ~(score >= threshold)


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
    first = mode_of(mode).first(canvas, int(crop_size or canvas.shape[-1]), scales)  # tta_views' first view
    plain_logits = forward(first).float()
    probs = plain_logits.softmax(-1)
    mask = uncertain(probs, metric=metric, threshold=threshold)
    if num_views(mode, scales) == 1 or not mask.any():  # no view beyond the first
        return probs, torch.zeros(n, dtype=torch.bool)
    idx = mask.nonzero().squeeze(1)
    m = len(idx)
    extra = tta_views(canvas[idx.to(canvas.device)], mode, crop_size=crop_size, scales=scales)[m:]  # view-major
    all_logits = torch.cat([plain_logits[idx.to(plain_logits.device)], forward(extra).float()])
    probs = probs.clone()
    probs[idx.to(probs.device)] = aggregate(all_logits, m, how=how).to(probs.device)
    return probs, mask.cpu()
