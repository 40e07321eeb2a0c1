"""Model registry. ``build_model(name, num_classes=..., **kwargs)`` is the one way models are made.

The checkpoint stores the registry name and the keyword arguments, so export and evaluation rebuild
exactly the trained architecture.

The large-image models (``se_resnext101_32x8d``, ``seresnext101_32x8d``, ``resnext101_mlp_head``,
``resnet50_attention``) are a :class:`BackboneClassifier`: ``model.backbone`` is a torchvision ResNet without its classifier (so a
torchvision state dict loads into it, see :func:`training.finetune.load_pretrained`) and ``model.head``
is everything after it, which is what differential learning rates and progressive unfreezing act on.
Their ``layers`` / ``groups`` / ``width_per_group`` arguments shrink the same family for CPU tests.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .layers import CBAM, ChannelAttention, SqueezeExcite

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


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "batchnorm": nn.BatchNorm2d,
    # No normalization: every sample is computed independently of its batch (exact DDP-vs-one-process
    # checks on CPU, where SyncBatchNorm does not exist).
    "none": lambda channels: nn.Identity(),
}


# Activations and gates by name (a checkpoint stores its model's keyword arguments as JSON): every one exports
# to ONNX and OpenVINO.
ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {"relu": partial(nn.ReLU, inplace=True),
                                                  "silu": partial(nn.SiLU, inplace=True), "gelu": nn.GELU}
GATE_LAYERS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


def _from_name(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]


def norm_layer_from_name(name: str) -> Callable[[int], nn.Module]:
    return _from_name(NORM_LAYERS, name, "norm_layer")


def _conv_bn_act(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[[], nn.Module] = ACT_LAYERS["relu"]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        norm_layer(out_ch),
        act_layer(),
    )


class CBAMBasicBlock(nn.Module):
    """3x3 -> 3x3 residual block with a CBAM gate on the residual branch; ``act_layer`` is the block's and CBAM's
    channel MLP's activation, ``gate_layer`` CBAM's two gates."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, reduction: int = 16,
                 spatial_kernel_size: int = 7, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[[], nn.Module] = ACT_LAYERS["relu"], gate_layer: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        self.conv1 = _conv_bn_act(in_ch, out_ch, 3, stride, norm_layer, act_layer)
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), norm_layer(out_ch))
        self.attn = CBAM(out_ch, reduction=reduction, spatial_kernel_size=spatial_kernel_size, norm_layer=norm_layer,
                         act_layer=act_layer, gate_layer=gate_layer)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm_layer(out_ch))
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.attn(self.conv2(self.conv1(x))) + self.shortcut(x))


class CBAMResNet(nn.Module):
    """The CIFAR seed's "EnhancedEfficientResNet": a small-image ResNet with CBAM in every block.

    3x3 stem, four stages of ``blocks_per_stage`` CBAM residual blocks (strides 1, 2, 2, 2), a 1x1
    "extra" convolution to ``head_width`` channels, global average pooling, dropout and a linear head.
    ``norm_layer``: ``"batchnorm"`` (the seed's) or ``"none"``; ``act_layer`` (:data:`ACT_LAYERS`, ``"relu"``
    the seed's) every activation, ``gate_layer`` (:data:`GATE_LAYERS`, ``"sigmoid"``) CBAM's gates.
    """

    def __init__(self, *, num_classes: int, widths: tuple[int, ...] = (40, 80, 160, 336),
                 blocks_per_stage: int = 2, head_width: int = 640, drop_rate: float = 0.3,
                 reduction: int = 16, spatial_kernel_size: int = 7, in_chans: int = 3,
                 norm_layer: str = "batchnorm", act_layer: str = "relu", gate_layer: str = "sigmoid"):
        super().__init__()
        norm = norm_layer_from_name(norm_layer)
        act, gate = _from_name(ACT_LAYERS, act_layer, "act_layer"), _from_name(GATE_LAYERS, gate_layer, "gate_layer")
        self.stem = _conv_bn_act(in_chans, widths[0], 3, norm_layer=norm, act_layer=act)
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CBAMBasicBlock(in_ch, width, stride=stride, reduction=reduction,
                                             spatial_kernel_size=spatial_kernel_size, norm_layer=norm,
                                             act_layer=act, gate_layer=gate))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.extra = _conv_bn_act(in_ch, head_width, 1, norm_layer=norm, act_layer=act)
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


class SEBottleneck(Bottleneck):
    """torchvision's Bottleneck with a squeeze-and-excitation gate on its residual branch, after the last
    BatchNorm and before the add (Hu et al., 2018; timm's SE-ResNeXt). Its other parameters keep
    torchvision's names, so a torchvision state dict loads into it, the ``se`` gates excepted. ``reduction``
    is a class attribute, as torchvision's ``_make_layer`` builds blocks with fixed arguments: see
    :func:`se_bottleneck`."""
    reduction = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.se = SqueezeExcite(self.conv3.out_channels, reduction=self.reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.relu(self.se(self.bn3(self.conv3(out))) + identity)


_SE_BLOCKS: dict[int, type[SEBottleneck]] = {SEBottleneck.reduction: SEBottleneck}


def se_bottleneck(reduction: int = 16) -> type[SEBottleneck]:
    """:class:`SEBottleneck` with another ``reduction``: one class per value, named in this module
    (``SEBottleneck8``), so that two models of one reduction share it and ``pickle``/``torch.save`` find it."""
    reduction = int(reduction)
    if reduction not in _SE_BLOCKS:
        name = f"SEBottleneck{reduction}"
        cls = type(name, (SEBottleneck,), {"reduction": reduction, "__module__": __name__, "__qualname__": name})
        globals()[name] = _SE_BLOCKS[reduction] = cls
    return _SE_BLOCKS[reduction]


class ResNetBackbone(ResNet):
    """torchvision's ResNet without its classifier (``fc`` is ``nn.Identity``).

    ``forward`` returns the pooled ``(N, num_features)`` vector, ``forward_features`` the last feature
    map ``(N, num_features, H/32, W/32)``. Parameter names are torchvision's, less ``fc.*``;
    ``added_modules``: the names of modules it adds to torchvision's blocks (``se``), whose weights a
    torchvision state dict cannot hold (:func:`training.finetune.load_pretrained` expects them missing).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], *, groups: int = 1,
                 width_per_group: int = 64):
        super().__init__(block, [int(n) for n in layers], num_classes=1, groups=groups,
                         width_per_group=width_per_group)
        self.num_features = 512 * block.expansion
        self.fc = nn.Identity()
        self.added_modules = ("se",) if issubclass(block, SEBottleneck) else ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


class BackboneClassifier(nn.Module):
    """``head(backbone(x))``: the head gets the pooled features, or the last feature map when
    ``head_on_feature_map`` (for heads that start with a spatial attention block and pool themselves)."""

    def __init__(self, backbone: ResNetBackbone, head: nn.Module, *, head_on_feature_map: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_on_feature_map = head_on_feature_map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x) if self.head_on_feature_map else self.backbone(x)
        return self.head(features)


def _mlp(in_features: int, hidden: Sequence[int], num_classes: int, *, drop_rate: float) -> list[nn.Module]:
    """``Linear -> BatchNorm1d -> ReLU -> Dropout`` per hidden width, then the ``Linear`` classifier."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
        in_features = width
    return layers + [nn.Linear(in_features, num_classes)]


@register_model
def se_resnext101_32x8d(*, num_classes: int, layers: Sequence[int] = (3, 4, 23, 3), groups: int = 32,
                        width_per_group: int = 8, reduction: int = 16, drop_rate: float = 0.5) -> nn.Module:
    """The seed's model: ResNeXt-101 32x8d, global pooling, ONE squeeze-and-excitation gate on the pooled
    2048 features, dropout and a linear classifier; 87.29 M parameters at 10 classes. Not Hu et al.'s
    SE-ResNeXt, which gates every bottleneck: that is :func:`seresnext101_32x8d` (timm's name)."""
    backbone = ResNetBackbone(Bottleneck, layers, groups=groups, width_per_group=width_per_group)
    head = nn.Sequential(SqueezeExcite(backbone.num_features, reduction=reduction), nn.Dropout(drop_rate),
                         nn.Linear(backbone.num_features, num_classes))
    return BackboneClassifier(backbone, head)


@register_model
def seresnext101_32x8d(*, num_classes: int, layers: Sequence[int] = (3, 4, 23, 3), groups: int = 32,
                       width_per_group: int = 8, reduction: int = 16, drop_rate: float = 0.0) -> nn.Module:
    """SE-ResNeXt-101 32x8d as Hu et al. (2018) and timm's ``seresnext101_32x8d``: a squeeze-and-excitation
    gate in every bottleneck (:class:`SEBottleneck`), global pooling, dropout and a linear classifier;
    93.57 M parameters at 1000 classes, timm's count. A torchvision ``resnext101_32x8d`` state dict fills all
    but the gates."""
    backbone = ResNetBackbone(se_bottleneck(reduction), layers, groups=groups, width_per_group=width_per_group)
    head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(backbone.num_features, num_classes))
    return BackboneClassifier(backbone, head)


@register_model
def resnext101_mlp_head(*, num_classes: int, layers: Sequence[int] = (3, 4, 23, 3), groups: int = 32,
                        width_per_group: int = 8, hidden: int = 512,
                        drop_rates: Sequence[float] = (0.3, 0.5)) -> nn.Module:
    """ResNeXt-101 32x8d with the head ``Dropout(0.3) -> Linear(2048, 512) -> ReLU -> BatchNorm1d ->
    Dropout(0.5) -> Linear(512, C)``; 87.80 M parameters at 10 classes."""
    backbone = ResNetBackbone(Bottleneck, layers, groups=groups, width_per_group=width_per_group)
    first_drop, second_drop = drop_rates
    head = nn.Sequential(nn.Dropout(first_drop), nn.Linear(backbone.num_features, hidden), nn.ReLU(inplace=True),
                         nn.BatchNorm1d(hidden), nn.Dropout(second_drop), nn.Linear(hidden, num_classes))
    return BackboneClassifier(backbone, head)


@register_model
def resnet50_attention(*, num_classes: int, layers: Sequence[int] = (3, 4, 6, 3), groups: int = 1,
                       width_per_group: int = 64, reduction: int = 16, hidden: Sequence[int] = (512, 256),
                       drop_rate: float = 0.5) -> nn.Module:
    """ResNet-50, CBAM channel attention on the last feature map, global pooling, then an MLP
    (``2048 -> 512 -> 256 -> C``, each hidden layer with BatchNorm, ReLU and dropout); 25.22 M
    parameters at 10 classes."""
    backbone = ResNetBackbone(Bottleneck, layers, groups=groups, width_per_group=width_per_group)
    head = nn.Sequential(ChannelAttention(backbone.num_features, reduction=reduction), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(1), *_mlp(backbone.num_features, hidden, num_classes, drop_rate=drop_rate))
    return BackboneClassifier(backbone, head, head_on_feature_map=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
