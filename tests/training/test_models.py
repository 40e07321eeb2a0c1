import pytest
import torch

from training.layers import CBAM, ChannelAttention, SpatialAttention
from training.models import build_model, count_parameters, list_models


def test_cbam_resnet_default_is_about_4_9m_parameters_at_10_classes():
    model = build_model("cbam_resnet", num_classes=10)
    assert count_parameters(model) == 4_936_626  # widths 40-80-160-336, 640-channel 1x1 conv


@pytest.mark.parametrize("size", [28, 32])
def test_cbam_resnet_output_shape(size):
    model = build_model("cbam_resnet", num_classes=7, widths=[8, 8, 16, 16], head_width=32).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, size, size)).shape == (3, 7)


def test_attention_blocks_keep_shape_and_gate_in_0_1():
    x = torch.randn(2, 32, 8, 8)
    for block in (ChannelAttention(32, reduction=4), SpatialAttention(kernel_size=3), CBAM(32)):
        y = block.eval()(x)
        assert y.shape == x.shape
        ratio = (y / x)[x.abs() > 1e-3]
        assert ratio.min() >= 0 and ratio.max() <= 1 + 1e-5  # a sigmoid gate only scales down


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="cbam_resnet"):
        build_model("resnet9000", num_classes=10)
    assert "cbam_resnet" in list_models()


def test_resnet50_baseline_has_100_class_head():
    model = build_model("resnet50", num_classes=100)
    assert count_parameters(model) == 23_712_932
    assert model.fc.out_features == 100
