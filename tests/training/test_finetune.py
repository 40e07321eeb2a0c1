import re

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from training.finetune import (
    ALL_STAGES,
    DEFAULT_SCHEDULE,
    ProgressiveUnfreezer,
    load_pretrained,
    param_groups,
    parse_schedule,
)
from training.models import build_model

TINY_RESNEXT = {"layers": (1, 1, 1, 1), "width_per_group": 4}


def tiny_model(num_classes: int = 4) -> nn.Module:
    return build_model("se_resnext101_32x8d", num_classes=num_classes, **TINY_RESNEXT)


def tiny_cbam(num_classes: int = 4) -> nn.Module:  # a registry model without backbone/head
    return build_model("cbam_resnet", num_classes=num_classes, widths=(8, 8, 16, 16), head_width=16)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# --- param_groups -----------------------------------------------------------------------------

def test_param_groups_split_backbone_and_head_with_and_without_decay():
    model = tiny_model()
    groups = param_groups(model, lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    assert by_name["backbone"]["lr"] == pytest.approx(1e-4) and by_name["head"]["lr"] == 1e-3
    assert by_name["backbone_no_decay"]["lr"] == pytest.approx(1e-4) and by_name["head_no_decay"]["lr"] == 1e-3
    assert by_name["backbone"]["weight_decay"] == by_name["head"]["weight_decay"] == 0.05
    assert by_name["backbone_no_decay"]["weight_decay"] == by_name["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for n in ("backbone", "head") for p in by_name[n]["params"])
    assert all(p.ndim <= 1 for n in ("backbone_no_decay", "head_no_decay") for p in by_name[n]["params"])
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for n in ("backbone", "backbone_no_decay") for p in by_name[n]["params"]} == backbone_ids
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_with_decay_everywhere_and_for_a_model_without_backbone():
    groups = param_groups(tiny_model(), lr=0.1, weight_decay=0.01, no_decay_norm_and_bias=False)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", pytest.approx(0.01), 0.01), ("head", 0.1, 0.01)]
    model = tiny_cbam()
    groups = param_groups(model, lr=0.1, backbone_lr_scale=0.5, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("all", 0.1, 0.01), ("all_no_decay", 0.1, 0.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# --- parse_schedule ---------------------------------------------------------------------------

def test_parse_schedule():
    assert parse_schedule("2:layer4,4:layer3,6:layer2") == {2: ["layer4"], 4: ["layer3"], 6: ["layer2"]}
    assert parse_schedule(" 4:layer3, 0:, 2:layer4 ,4:layer2,") == {0: [], 2: ["layer4"], 4: ["layer3", "layer2"]}
    assert parse_schedule("") == {}
    for bad in ("layer4", "x:layer4", "-1:layer4", "2"):
        with pytest.raises(ValueError, match="EPOCH:STAGE"):
            parse_schedule(bad)


# --- ProgressiveUnfreezer ---------------------------------------------------------------------

def trainable_stages(model: nn.Module) -> list[str]:
    return [name for name, child in model.backbone.named_children()
            if any(p.requires_grad for p in child.parameters())]


def test_unfreezer_default_schedule_head_first_then_deepest_stages():
    model = tiny_model()
    unfreezer = ProgressiveUnfreezer(model)
    assert unfreezer.schedule == DEFAULT_SCHEDULE
    assert trainable_stages(model) == [] and all(p.requires_grad for p in model.head.parameters())
    assert [unfreezer.apply(epoch) for epoch in range(8)] == [[], [], ["layer4"], [], ["layer3"], [], ["layer2"], []]
    assert trainable_stages(model) == ["layer2", "layer3", "layer4"]
    assert unfreezer.frozen_stages() == ["conv1", "bn1", "relu", "maxpool", "layer1", "avgpool", "fc"]


def test_unfreezer_catches_up_when_resuming_and_accepts_all():
    model = tiny_model()
    assert ProgressiveUnfreezer(model, schedule={1: ["layer4"], 3: ["layer3"]}).apply(5) == ["layer4", "layer3"]
    model = tiny_model()
    unfreezer = ProgressiveUnfreezer(model, schedule=parse_schedule(f"1:layer4,3:{ALL_STAGES}"))
    assert unfreezer.apply(1) == ["layer4"]
    assert unfreezer.apply(3) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert all(p.requires_grad for p in model.parameters())


def test_unfreezer_errors():
    with pytest.raises(ValueError, match="layer5.*choose from conv1"):
        ProgressiveUnfreezer(tiny_model(), schedule={2: ["layer5"]})
    with pytest.raises(ValueError, match="backbone.*CBAMResNet"):
        ProgressiveUnfreezer(tiny_cbam())


def test_optimizer_step_changes_only_unfrozen_parameters():
    torch.manual_seed(0)
    model = tiny_model()
    unfreezer = ProgressiveUnfreezer(model)
    unfreezer.apply(2)  # head + layer4
    unfreezer.set_train_mode()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=0.1))
    before = snapshot(model)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        trainable = name.startswith(("head.", "backbone.layer4."))
        assert param.requires_grad == trainable, name
        if not trainable:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), name  # not even weight decay touches it
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("head.") for n in changed) and any(n.startswith("backbone.layer4.") for n in changed)


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    model = tiny_model()
    unfreezer = ProgressiveUnfreezer(model, schedule={0: ["layer4"]})
    unfreezer.apply(0)
    model.train()  # what a training loop does ...
    assert model.backbone.bn1.training
    unfreezer.set_train_mode()  # ... followed by this
    assert model.training and model.head.training
    assert not model.backbone.bn1.training and not model.backbone.layer3[0].bn1.training
    assert model.backbone.layer4[0].bn1.training
    frozen_stats = model.backbone.layer3[0].bn1.running_mean.clone()
    live_stats = model.backbone.layer4[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.backbone.layer3[0].bn1.running_mean, frozen_stats)
    assert not torch.equal(model.backbone.layer4[0].bn1.running_mean, live_stats)
    unfreezer.set_train_mode(False)
    assert not any(m.training for m in model.modules())


def test_unfreezing_a_stage_in_training_mode_puts_its_batchnorm_back_in_training():
    model = tiny_model()
    unfreezer = ProgressiveUnfreezer(model)
    unfreezer.set_train_mode()
    assert not model.backbone.layer4[0].bn1.training
    unfreezer.apply(2)
    assert model.backbone.layer4[0].bn1.training and not model.backbone.layer3[0].bn1.training


# --- load_pretrained --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """A shrunk torchvision ResNeXt (same family as TINY_RESNEXT) with its 1000-class fc, saved as a state dict."""
    torch.manual_seed(1)
    reference = ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)
    path = tmp_path_factory.mktemp("pretrained") / "resnext_tiny.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.state_dict()


def test_load_pretrained_fills_the_backbone_and_skips_fc(torchvision_weights):
    path, state = torchvision_weights
    model = tiny_model()
    head_before = snapshot(model.head)
    report = load_pretrained(model, path)
    assert report["skipped"] == ["fc.bias", "fc.weight"]
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["loaded"] == sorted(model.backbone.state_dict())
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(torch.equal(p, head_before[n]) for n, p in model.head.named_parameters())


def test_load_pretrained_reports_shape_mismatches_and_extra_keys(torchvision_weights, tmp_path):
    _, state = torchvision_weights
    state = dict(state)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    state["extra.weight"] = torch.zeros(3)
    del state["layer1.0.bn3.bias"]
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)  # DDP checkpoint
    model = tiny_model()
    stem_before = model.backbone.conv1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"1 of another shape, e.g. conv1.weight \(64, 1, 7, 7\) vs \(64, 3, 7, 7\); "
                                         r"1 the model lacks, e.g. extra.weight; 1 the file lacks, e.g. "
                                         r"layer1.0.bn3.bias.*--pretrained-partial"):
        load_pretrained(model, path)  # by default: the architecture's own weights or nothing
    assert torch.equal(model.backbone.conv1.weight, stem_before)
    report = load_pretrained(model, path, partial=True)
    assert report["skipped"] == ["conv1.weight", "fc.bias", "fc.weight"]
    assert report["unexpected"] == ["extra.weight"] and report["missing"] == ["layer1.0.bn3.bias"]
    assert "layer4.0.conv2.weight" in report["loaded"] and "conv1.weight" not in report["loaded"]
    assert torch.equal(model.backbone.conv1.weight, stem_before)
    assert torch.equal(model.backbone.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])


def test_load_pretrained_into_a_model_without_backbone(tmp_path):
    source = tiny_cbam(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "cbam.pt")
    model = tiny_cbam(num_classes=3)  # another number of classes: fc.* is skipped either way
    report = load_pretrained(model, tmp_path / "cbam.pt")
    assert report["skipped"] == ["fc.bias", "fc.weight"] and report["missing"] == []
    assert torch.equal(model.stem[0].weight, source.stem[0].weight)


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_pretrained(tiny_model(), tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a torch state dict file"):
        load_pretrained(tiny_model(), tmp_path / "garbage.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_pretrained(tiny_model(), tmp_path / "list.pth")
    torch.save(ResNet(BasicBlock, [1, 1, 1, 1]).state_dict(), tmp_path / "resnet10.pth")  # another architecture
    with pytest.raises(ValueError, match="is not a ResNetBackbone of this architecture"):
        load_pretrained(tiny_model(), tmp_path / "resnet10.pth")
    with pytest.raises(ValueError, match="matches only .* weights of ResNetBackbone"):
        load_pretrained(tiny_model(), tmp_path / "resnet10.pth", partial=True)


def test_weights_of_other_groups_or_depth_are_refused_not_half_loaded(tmp_path):
    """ResNeXt 64x4d weights fit every tensor of a 32x8d model but its grouped 3x3 convs, and a deeper
    ResNet's file holds every tensor of a shallower one: loading "what matches" left those layers random."""
    other_groups = ResNet(Bottleneck, [1, 1, 1, 1], groups=16, width_per_group=8)  # tiny_model: 32 x 4
    torch.save(other_groups.state_dict(), tmp_path / "g16.pth")
    with pytest.raises(ValueError, match=r"of another shape, e.g. layer1.0.conv2.weight"):
        load_pretrained(tiny_model(), tmp_path / "g16.pth")
    deeper = ResNet(Bottleneck, [1, 1, 2, 1], groups=32, width_per_group=4)
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ValueError, match=r"the model lacks, e.g. layer3.1.bn1.bias"):
        load_pretrained(tiny_model(), tmp_path / "deeper.pth")


def test_this_projects_checkpoint_gives_its_backbone(tmp_path):
    source = tiny_model()
    torch.save({"state_dict": source.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    model = tiny_model()
    report = load_pretrained(model, tmp_path / "best.pt")
    assert report["missing"] == [] and report["unexpected"] == [] and report["loaded"] == sorted(
        model.backbone.state_dict())
    assert all(k.startswith("head.") for k in report["skipped"]) and report["skipped"]
    assert all(torch.equal(v, source.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items())


@pytest.mark.parametrize("options, said", [
    (["--backbone-lr-scale", "0.1"], "--backbone-lr-scale 0.1: --arch cbam_resnet has no backbone to scale"),
    (["--pretrained-partial"], "--pretrained-partial needs --pretrained FILE"),
])
def test_fine_tuning_options_a_model_cannot_use_are_refused_first(image_folder, tmp_path, options, said):
    """--backbone-lr-scale on a model without a backbone was silently ignored (everything at the full lr).
    A ValueError is the CLI's one line (inference.cli), before any data is read or folder made."""
    from training.__main__ import main
    with pytest.raises(ValueError, match=re.escape(said)):
        main(["train", "--data", str(image_folder), "--input-size", "16", "--out", str(tmp_path / "run"),
              "--no-progress", *options])
    assert not (tmp_path / "run").exists()


def test_files_without_batchnorm_step_counters_load(torchvision_weights, tmp_path):
    """Files saved before PyTorch 0.4.1 (torchvision's first model-zoo weights among them) have no
    num_batches_tracked buffers; torch loads them, and so does --pretrained."""
    _, state = torchvision_weights
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    report = load_pretrained(tiny_model(), tmp_path / "old.pth")
    assert report["missing"] and all(k.endswith("num_batches_tracked") for k in report["missing"])
