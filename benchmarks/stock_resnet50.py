"""Model file for the stock TorchServe baseline (``torch-model-archiver --model-file``): torchvision's
ResNet-50 with 100 classes, as TorchServe's eager mode expects it (one nn.Module class, no arguments)."""
from torchvision.models.resnet import Bottleneck, ResNet


class ResNet50(ResNet):
    def __init__(self):
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=100)
