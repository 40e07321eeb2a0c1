"""Attention layers, one block per class (timm style: every knob is an argument, short ``forward``).

* :class:`ChannelAttention` -- CBAM's channel gate: a shared MLP over the average- and max-pooled
  channel descriptors, summed, then a sigmoid.
* :class:`SpatialAttention` -- CBAM's spatial gate: a ``k x k`` convolution over the channel-wise
  mean and max maps, then a sigmoid.
* :class:`CBAM` -- channel gate followed by spatial gate (Woo et al., 2018).
* :class:`SqueezeExcite` -- squeeze-and-excitation (Hu et al., 2018): a bottleneck MLP over the
  average-pooled channel descriptor, then a sigmoid. Takes feature maps ``(N, C, *spatial)`` or
  already pooled vectors ``(N, C)`` (where the squeeze is the identity).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _hidden_channels(channels: int, reduction: int, min_channels: int) -> int:
    return max(channels // reduction, min_channels)


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, *, reduction: int = 16, min_channels: int = 8,
                 act_layer: type[nn.Module] = nn.ReLU, gate_layer: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        hidden = _hidden_channels(channels, reduction, min_channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, *, kernel_size: int = 7, gate_layer: type[nn.Module] = nn.Sigmoid,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = norm_layer(1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * self.gate(self.bn(self.conv(maps)))


class CBAM(nn.Module):
    def __init__(self, channels: int, *, reduction: int = 16, min_channels: int = 8, spatial_kernel_size: int = 7,
                 act_layer: type[nn.Module] = nn.ReLU, gate_layer: type[nn.Module] = nn.Sigmoid,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction=reduction, min_channels=min_channels, act_layer=act_layer,
                                        gate_layer=gate_layer)
        self.spatial = SpatialAttention(kernel_size=spatial_kernel_size, gate_layer=gate_layer, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, *, reduction: int = 16, min_channels: int = 8,
                 act_layer: type[nn.Module] = nn.ReLU, gate_layer: type[nn.Module] = nn.Sigmoid, bias: bool = True):
        super().__init__()
        hidden = _hidden_channels(channels, reduction, min_channels)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, channels, bias=bias)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.flatten(2).mean(2) if x.dim() > 2 else x
        weights = self.gate(self.fc2(self.act(self.fc1(squeezed))))
        return x * weights.view(weights.shape + (1,) * (x.dim() - weights.dim()))
