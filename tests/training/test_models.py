import pytest
import torch
from torchvision.models.resnet import ResNet

from training.layers import CBAM, ChannelAttention, SpatialAttention, SqueezeExcite
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


# --- squeeze-and-excitation -------------------------------------------------------------------

def test_squeeze_excite_on_maps_and_pooled_vectors_keeps_shape_and_gates_in_0_1():
    se = SqueezeExcite(32, reduction=4).eval()
    for x in (torch.randn(2, 32, 8, 8), torch.randn(2, 32), torch.randn(2, 32, 5)):
        y = se(x)
        assert y.shape == x.shape
        ratio = (y / x)[x.abs() > 1e-3]
        assert ratio.min() >= 0 and ratio.max() <= 1 + 1e-5


def test_squeeze_excite_on_a_map_gates_like_on_its_pooled_vector():
    se = SqueezeExcite(16, reduction=4).eval()
    vector = torch.randn(3, 16)
    constant_map = vector[:, :, None, None].expand(3, 16, 4, 4)  # the pooled descriptor is ``vector`` itself
    torch.testing.assert_close(se(constant_map), se(vector)[:, :, None, None].expand(3, 16, 4, 4))


def test_squeeze_excite_knobs():
    se = SqueezeExcite(64, reduction=16, min_channels=8, act_layer=torch.nn.SiLU, gate_layer=torch.nn.Hardsigmoid)
    assert (se.fc1.in_features, se.fc1.out_features, se.fc2.out_features) == (64, 8, 64)  # 64 // 16 = 4 < 8
    assert isinstance(se.act, torch.nn.SiLU) and isinstance(se.gate, torch.nn.Hardsigmoid)
    assert SqueezeExcite(2048).fc1.out_features == 128
    assert SqueezeExcite(64, bias=False).fc1.bias is None


# --- the seed projects' large-image models ----------------------------------------------------

NEW_MODELS = ("se_resnext101_32x8d", "seresnext101_32x8d", "resnext101_mlp_head", "resnet50_attention")
TINY = {  # the same families, shrunk to train on a CPU in tests
    "se_resnext101_32x8d": {"layers": (1, 1, 1, 1), "width_per_group": 4},
    "seresnext101_32x8d": {"layers": (1, 1, 1, 1), "width_per_group": 4},
    "resnext101_mlp_head": {"layers": (1, 1, 1, 1), "width_per_group": 4, "hidden": 32},
    "resnet50_attention": {"layers": (1, 1, 1, 1), "width_per_group": 16, "hidden": (32, 16)},
}


@pytest.mark.parametrize("name, num_classes, expected", [
    ("se_resnext101_32x8d", 10, 87_289_290),
    ("se_resnext101_32x8d", 1000, 89_317_800),
    ("seresnext101_32x8d", 1000, 93_569_048),  # timm's seresnext101_32x8d: resnext101_32x8d + 4,777,712 in SE
    ("seresnext101_32x8d", 10, 91_540_538),
    ("resnext101_mlp_head", 10, 87_797_578),
    ("resnext101_mlp_head", 1000, 88_305_448),
    ("resnet50_attention", 10, 25_216_842),
    ("resnet50_attention", 1000, 25_471_272),
])
def test_full_size_parameter_counts(name, num_classes, expected):
    with torch.device("meta"):  # no memory, no initialisation: counts only
        model = build_model(name, num_classes=num_classes)
    assert count_parameters(model) == expected


def test_full_size_backbones_are_torchvisions_without_fc():
    import torchvision
    with torch.device("meta"):
        resnext, resnet = torchvision.models.resnext101_32x8d(), torchvision.models.resnet50()
        se = build_model("se_resnext101_32x8d", num_classes=10)
        attention = build_model("resnet50_attention", num_classes=10)
    assert count_parameters(resnext) == 88_791_336
    assert count_parameters(resnet) == 25_557_032
    assert count_parameters(se.backbone) == 88_791_336 - 2_049_000 == 86_742_336  # fc is 2048 x 1000 + 1000
    assert count_parameters(attention.backbone) == 25_557_032 - 2_049_000 == 23_508_032
    expected = {k: v.shape for k, v in resnext.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in se.backbone.state_dict().items()} == expected


@pytest.mark.parametrize("name", NEW_MODELS)
def test_backbone_and_head_structure(name):
    model = build_model(name, num_classes=5, **TINY[name])
    assert isinstance(model.backbone, ResNet) and isinstance(model.backbone.fc, torch.nn.Identity)
    assert model.backbone.num_features == 2048
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    head_ids = {id(p) for p in model.head.parameters()}
    assert not backbone_ids & head_ids
    assert len(backbone_ids) + len(head_ids) == len(list(model.parameters()))  # nothing outside the two
    assert model.head[-1].out_features == 5


@pytest.mark.parametrize("name", NEW_MODELS)
@pytest.mark.parametrize("size", [32, 64])
def test_shrunk_variants_output_shape(name, size):
    model = build_model(name, num_classes=7, **TINY[name]).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_heads_are_the_seed_projects():
    se = build_model("se_resnext101_32x8d", num_classes=3, drop_rate=0.2, **TINY["se_resnext101_32x8d"])
    assert [type(m) for m in se.head] == [SqueezeExcite, torch.nn.Dropout, torch.nn.Linear]
    assert se.head[1].p == 0.2 and se.head[0].fc1.out_features == 128

    mlp = build_model("resnext101_mlp_head", num_classes=3, layers=[1, 1, 1, 1], width_per_group=4)
    assert [type(m).__name__ for m in mlp.head] == ["Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert (mlp.head[0].p, mlp.head[4].p, mlp.head[1].out_features) == (0.3, 0.5, 512)

    attention = build_model("resnet50_attention", num_classes=3, drop_rate=0.4, **TINY["resnet50_attention"])
    assert isinstance(attention.head[0], ChannelAttention)
    linears = [m for m in attention.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 32), (32, 16), (16, 3)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in attention.head) == 2
    assert {m.p for m in attention.head if isinstance(m, torch.nn.Dropout)} == {0.4}


def test_se_resnext_gates_every_bottleneck_before_the_residual_add():
    """Hu et al.'s SE-ResNeXt (timm's seresnext101_32x8d): one SE gate per bottleneck, on the residual branch
    after bn3 and before the add; closing every gate leaves relu(identity)."""
    from training.models import SEBottleneck
    model = build_model("seresnext101_32x8d", num_classes=3, layers=[2, 1, 1, 1], width_per_group=4).eval()
    blocks = [m for m in model.backbone.modules() if isinstance(m, SEBottleneck)]
    assert len(blocks) == 5 and all(isinstance(b.se, SqueezeExcite) for b in blocks)
    assert [b.se.fc1.in_features for b in blocks] == [256, 256, 512, 1024, 2048]
    block = blocks[1]  # no downsample: identity is the input
    x = torch.randn(2, 256, 6, 6)
    with torch.no_grad():
        block.se.fc2.bias.fill_(-1e4)  # sigmoid -> 0: the residual branch is shut
        torch.testing.assert_close(block(x), torch.relu(x))
        block.se.fc2.weight.zero_()
        block.se.fc2.bias.fill_(1e4)  # sigmoid -> 1: torchvision's Bottleneck exactly
        plain = torch.nn.Sequential(block.conv1, block.bn1, block.relu, block.conv2, block.bn2, block.relu,
                                    block.conv3, block.bn3)
        torch.testing.assert_close(block(x), torch.relu(plain(x) + x))


def test_a_torchvision_resnext_state_dict_fills_se_resnext_but_its_gates(tmp_path):
    from torchvision.models.resnet import Bottleneck, ResNet

    from training.finetune import load_pretrained
    donor = ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)
    torch.save(donor.state_dict(), tmp_path / "resnext.pth")
    model = build_model("seresnext101_32x8d", num_classes=3, **TINY["seresnext101_32x8d"])
    report = load_pretrained(model, tmp_path / "resnext.pth")
    assert report["missing"] and all(".se." in k for k in report["missing"]) and report["unexpected"] == []
    assert torch.equal(model.backbone.layer4[0].conv2.weight, donor.layer4[0].conv2.weight)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_shrunk_model_trains_and_traces():
    model = build_model("resnet50_attention", num_classes=4, **TINY["resnet50_attention"])
    x = torch.randn(4, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.head[0].fc1.weight.grad is not None and model.backbone.conv1.weight.grad is not None
    for name in ("se_resnext101_32x8d", "seresnext101_32x8d"):
        se = build_model(name, num_classes=4, **TINY[name]).eval()
        with torch.no_grad():
            traced = torch.jit.trace(se, x[:1], check_trace=False)  # export traces the model
            torch.testing.assert_close(traced(x), se(x))


def test_cbam_against_a_reference_written_from_the_paper():
    """Woo et al. (2018): channel gate = sigmoid(MLP(avgpool) + MLP(maxpool)) with ONE shared MLP; spatial gate
    = sigmoid(conv7x7([mean over channels, max over channels])) (timm adds the BatchNorm kept here); channel
    first. Written here from the paper, against training.layers (shape-only tests would miss a swap)."""
    torch.manual_seed(0)
    block = CBAM(16, reduction=4, min_channels=1).eval()
    x = torch.randn(2, 16, 5, 5)
    ch, sp = block.channel, block.spatial
    mlp = lambda v: ch.fc2(torch.relu(ch.fc1(v)))  # noqa: E731
    after_channel = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    maps = torch.cat([after_channel.mean(1, keepdim=True), after_channel.amax(1, keepdim=True)], 1)
    expected = after_channel * torch.sigmoid(sp.bn(sp.conv(maps)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)
    assert ch.fc1.out_channels == 4 and sp.conv.kernel_size == (7, 7)  # 16 / reduction 4; knobs reach the gates
    assert isinstance(CBAM(16, gate_layer=torch.nn.Hardsigmoid).spatial.gate, torch.nn.Hardsigmoid)


def test_cbam_resnet_activation_and_gate_are_arguments_that_export():
    """Every knob an argument (timm's layers): the activation and CBAM's gate by name, as a checkpoint's JSON
    model_kwargs holds them; the defaults are the seed's ReLU and sigmoid, so earlier checkpoints rebuild alike."""
    import onnxruntime as ort
    from torch import nn

    kwargs = dict(widths=[8, 8, 16, 16], head_width=32, blocks_per_stage=1)
    torch.manual_seed(0)
    default = build_model("cbam_resnet", num_classes=5, **kwargs).eval()
    torch.manual_seed(0)
    explicit = build_model("cbam_resnet", num_classes=5, act_layer="relu", gate_layer="sigmoid", **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(default(x), explicit(x))
    model = build_model("cbam_resnet", num_classes=5, act_layer="silu", gate_layer="hardsigmoid", **kwargs).eval()
    kinds = {type(m) for m in model.modules()}
    assert nn.SiLU in kinds and nn.Hardsigmoid in kinds and nn.ReLU not in kinds and nn.Sigmoid not in kinds
    model.load_state_dict(default.state_dict())  # activations hold no weights: the same state dict
    buf = __import__("io").BytesIO()
    torch.onnx.export(model, (x,), buf, input_names=["x"], dynamo=False)
    out = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="unknown act_layer 'swish'; choose one of relu, silu, gelu"):
        build_model("cbam_resnet", num_classes=5, act_layer="swish")
    with pytest.raises(ValueError, match="unknown gate_layer 'tanh'; choose one of sigmoid, hardsigmoid"):
        build_model("cbam_resnet", num_classes=5, gate_layer="tanh")


def test_se_blocks_of_one_reduction_are_one_class_that_pickles():
    """se_bottleneck made a new unnamed class per call: two models of one reduction had different block classes,
    and pickle / torch.save(model) failed ("Can't pickle <class 'training.models.SEBottleneck16'>")."""
    import pickle

    from training.models import SEBottleneck, se_bottleneck
    assert se_bottleneck(16) is SEBottleneck and se_bottleneck(8) is se_bottleneck(8.0)
    block = se_bottleneck(8)(64, 16)
    copy = pickle.loads(pickle.dumps(block))
    assert type(copy) is se_bottleneck(8) and copy.reduction == 8 and copy.se is not None
