"""Batch-level Mixup / CutMix on top of ``torchvision.transforms.v2.MixUp`` and ``v2.CutMix``.

Used like timm's ``Mixup`` / torchvision's classification references: after the DataLoader, on the
float (normalized) batch::

    mixer = BatchMixer(num_classes=K, mixup_alpha=0.2, cutmix_alpha=1.0)
    images, targets = mixer(images, labels)   # targets: float (N, K), rows sum to 1
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(model(images), targets)

:class:`BatchMixer` always returns soft targets (one-hot rows when the batch is not mixed), so the
loss sees one kind of target whatever happened. Sample ``i`` is mixed with sample ``i - 1`` (the
batch is rolled by one, torchvision's convention), so the batch must be shuffled.
"""
from __future__ import annotations

import torch
from torch.nn.functional import one_hot
from torchvision.transforms import v2


class BatchMixer:
    """With probability ``prob`` mix a batch: CutMix with probability ``switch_prob`` when both alphas
    are positive, otherwise the one that is on; ``Beta(alpha, alpha)`` draws the mixing weight.

    ``enabled`` is false when both alphas are 0 (then every batch gets one-hot targets).
    """

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be at least 1, not {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0: off), not {mixup_alpha}, {cutmix_alpha}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], not {value}")
        self.num_classes = int(num_classes)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        k = self.num_classes
        self.mixup = v2.MixUp(alpha=self.mixup_alpha, num_classes=k) if self.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=self.cutmix_alpha, num_classes=k) if self.cutmix_alpha > 0 else None

    @property
    def enabled(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return one_hot(labels, num_classes=self.num_classes).to(torch.float32)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: float ``(N, C, H, W)``; ``labels``: int64 ``(N,)`` ->
        ``(images, float32 targets (N, num_classes))``. Uses torch's global random generator."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"BatchMixer expects a float (N, C, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.dtype != torch.long or len(labels) != len(images):
            raise ValueError(f"BatchMixer expects int64 labels of shape ({len(images)},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if not self.enabled or (self.prob < 1.0 and torch.rand(()).item() >= self.prob):
            return images, self.one_hot(labels)
        if self.mixup is None:
            mixer = self.cutmix
        elif self.cutmix is None:
            mixer = self.mixup
        else:
            mixer = self.cutmix if torch.rand(()).item() < self.switch_prob else self.mixup
        images, targets = mixer(images, labels)
        return images, targets.to(torch.float32)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob})")
