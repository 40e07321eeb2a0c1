"""What one TorchServe batch carries from the handler's preprocess to inference and postprocess."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.requests import Request


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
