"""What one TorchServe batch carries from the handler's preprocess to inference and postprocess, and how
its images are stacked into one tensor without one request's failure reaching another's."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    failure: Exception | None = None                      # the model itself failed: 500 for the batch
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
