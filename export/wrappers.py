"""Graphs that take raw uint8 images: the normalization is part of the exported model."""
from __future__ import annotations

import torch
from torch import nn


class FusedNormalization(nn.Module):
    """uint8 ``(N, 3, H, W)`` -> logits. Computes ``model((x / 255 - mean) / std)``.

    ``/255``, ``-mean`` and ``/std`` are folded into one per-channel affine ``x * scale + shift``
    (``scale = 1 / (255 std)``, ``shift = -mean / std``): one multiply-add in the graph instead of
    three ops, and no float preprocessing left for clients or the handler.
    """

    def __init__(self, model: nn.Module, *, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).float())
        self.register_buffer("shift", (-mean_t / std_t).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() * self.scale + self.shift)
