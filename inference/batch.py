"""What one TorchServe batch carries from the handler's preprocess to inference and postprocess, and how
its images are stacked into one tensor and run through the model without one request's failure reaching
another's."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from inference.requests import Request, RequestError
from inference.responses import failure_reason

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """What the handler's preprocess hands to inference and postprocess."""
    size: int                                             # requests in the batch
    owners: list[int] = field(default_factory=list)       # request index of each decoded image
    canvas: torch.Tensor | None = None                    # (M, 3, R, R) uint8, one row per image
    requests: dict[int, Request] = field(default_factory=dict)
    protocols: dict[int, str] = field(default_factory=dict)  # request index -> its protocol
    topk: dict[int, int] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)
    values: torch.Tensor | None = None                    # (M, k) top-k probabilities, sorted
    indices: torch.Tensor | None = None                   # (M, k) their class indices
    tta_applied: torch.Tensor | None = None               # (M,) bool
    failure: Exception | None = None                      # the model failed on every request: 500 for all
    timings: dict[str, float] = field(default_factory=dict)


def stack_images(images: list[tuple[torch.Tensor, int]], errors: dict[int, Exception], *,
                 name: str = "") -> tuple[torch.Tensor | None, list[int]]:
    """``(canvas, owners)`` of ``(image, owner request)`` pairs: one ``torch.stack``; when that fails (out of
    memory, say) each request is stacked alone, a request that fails so gets its 500 in ``errors``, and the
    rest are joined, the largest request failing first while even that join fails. Never raises."""
    try:
        return torch.stack([img for img, _ in images]), [o for _, o in images]
    except Exception:
        log.exception("%s: stacking a batch of %d images failed; retrying request by request", name, len(images))
    parts: dict[int, torch.Tensor] = {}
    for owner in dict.fromkeys(o for _, o in images):
        try:
            parts[owner] = torch.stack([img for img, o in images if o == owner])
        except Exception as e:
            errors[owner] = RequestError(f"preprocessing failed: {failure_reason(e)}", status=500,
                                         error="preprocess failed")
    while parts:
        try:
            return torch.cat(list(parts.values())), [o for o, t in parts.items() for _ in range(len(t))]
        except Exception as e:  # still too large together: the largest request fails, the others are tried again
            largest = max(parts, key=lambda o: parts[o].numel())
            del parts[largest]
            errors[largest] = RequestError(f"preprocessing failed: {failure_reason(e)}", status=500,
                                         error="preprocess failed")
    return None, []


def predict_per_request(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], batch: Batch, *, name: str = "") -> None:
    """``batch.values, batch.indices, batch.tta_applied = fn(batch.canvas)``, once; when that fails (out of
    memory on one request's many images or TTA views, say) request by request, so that a request that fails
    alone gets its 500 in ``batch.errors`` and the others their answers (``canvas`` and ``owners`` then keep
    the rows answered). ``batch.failure`` is set when every request failed. Never raises."""
    try:
        batch.values, batch.indices, batch.tta_applied = (t.cpu() for t in fn(batch.canvas))
        return
    except Exception as e:
        log.exception("%s: inference failed for a batch of %d images", name, len(batch.canvas))
        batch.failure = e
    if len(set(batch.owners)) == 1:
        return
    parts, kept = [], []
    for owner in dict.fromkeys(batch.owners):
        rows = [k for k, o in enumerate(batch.owners) if o == owner]
        try:
            parts.append([t.cpu() for t in fn(batch.canvas[rows])])
            kept += rows
        except Exception as e:
            batch.errors[owner] = RequestError(f"the model failed on this request: {failure_reason(e)}", status=500,
                                               error="inference failed")
    if parts:
        log.warning("%s: request by request, %d of %d requests answered", name, len(parts), len(set(batch.owners)))
        batch.values, batch.indices, batch.tta_applied = (torch.cat(columns) for columns in zip(*parts))
        batch.canvas, batch.owners, batch.failure = batch.canvas[kept], [batch.owners[k] for k in kept], None
