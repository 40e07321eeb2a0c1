"""Model registry. ``build_model(name, num_classes=..., **kwargs)`` is the one way models are made.

The checkpoint stores the registry name and the keyword arguments, so export and evaluation rebuild
exactly the trained architecture.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .layers import CBAM

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def _conv_bn_act(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class CBAMBasicBlock(nn.Module):
    """3x3 -> 3x3 residual block with a CBAM gate on the residual branch."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, reduction: int = 16,
                 spatial_kernel_size: int = 7):
        super().__init__()
        self.conv1 = _conv_bn_act(in_ch, out_ch, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
        self.attn = CBAM(out_ch, reduction=reduction, spatial_kernel_size=spatial_kernel_size)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.attn(self.conv2(self.conv1(x))) + self.shortcut(x))


class CBAMResNet(nn.Module):
    """The CIFAR seed's "EnhancedEfficientResNet": a small-image ResNet with CBAM in every block.

    3x3 stem, four stages of ``blocks_per_stage`` CBAM residual blocks (strides 1, 2, 2, 2), a 1x1
    "extra" convolution to ``head_width`` channels, global average pooling, dropout and a linear head.
    """

    def __init__(self, *, num_classes: int, widths: tuple[int, ...] = (40, 80, 160, 336),
                 blocks_per_stage: int = 2, head_width: int = 640, drop_rate: float = 0.3,
                 reduction: int = 16, spatial_kernel_size: int = 7, in_chans: int = 3):
        super().__init__()
        self.stem = _conv_bn_act(in_chans, widths[0], 3)
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CBAMBasicBlock(in_ch, width, stride=stride, reduction=reduction,
                                             spatial_kernel_size=spatial_kernel_size))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.extra = _conv_bn_act(in_ch, head_width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(head_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.extra(self.stages(self.stem(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


@register_model
def cbam_resnet(*, num_classes: int, **kwargs) -> nn.Module:
    """CBAM ResNet for small images (32x32); about 4.9 M parameters at 10 classes."""
    kwargs = {k: tuple(v) if k == "widths" else v for k, v in kwargs.items()}
    return CBAMResNet(num_classes=num_classes, **kwargs)


@register_model
def resnet50(*, num_classes: int, **kwargs) -> nn.Module:
    """torchvision's ResNet-50 (no attention): the stock TorchServe baseline's model. Random init;
    no pretrained weights are downloaded."""
    import torchvision
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
