"""Test-time augmentation as one batched forward. Shared by offline evaluation and the handler.

Flat-importable (no relative imports): it travels inside the ``.mar``.
"""
from __future__ import annotations

from typing import Callable

import torch

TTA_MODES = ("none", "flip")


def tta_views(images: torch.Tensor, mode: str) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(V * N, C, H, W)``, view-major (all originals, then all flips)."""
    if mode == "none":
        return images
    if mode == "flip":
        return torch.cat([images, images.flip(-1)])
    raise ValueError(f"unknown TTA mode {mode!r}; choose one of {TTA_MODES}")


def num_views(mode: str) -> int:
    return {"none": 1, "flip": 2}[mode]


def aggregate(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """``(V * N, K)`` logits -> ``(N, K)`` probabilities: the mean softmax over views."""
    probs = logits.float().softmax(-1)
    return probs.view(num_views(mode), -1, probs.shape[-1]).mean(0)


def predict_proba(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str) -> torch.Tensor:
    """Run ``forward`` once over every view of every image and return mean-softmax probabilities."""
    return aggregate(forward(tta_views(images, mode)), mode)
