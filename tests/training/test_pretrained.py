"""``--pretrained PATH``: a state dict saved as the README says (``torch.save(torchvision.models.resnet50(
weights=...).state_dict(), PATH)``, here from a randomly initialised model) is loaded, then trained from."""
from pathlib import Path

import pytest
import torch
import torchvision

from training.__main__ import main
from training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # two one-step ResNet-50 runs
LR = 2e-3


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    torch.manual_seed(1234)  # not the training seed: the file's weights differ from the run's own initialisation
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)  # as in the README, weights=None
    return path, torch.load(path, weights_only=True)


def test_the_readme_documents_this_command():
    text = (REPO / "README.md").read_text()
    assert "torch.save(torchvision.models.resnet50(weights=" in text and "--pretrained" in text


def train_one_step(small_folder, out, *args) -> dict:
    # 36 training images in one batch, no validation split: exactly one optimizer step
    assert main(["train", "--data", str(small_folder), "--out", str(out), "--epochs", "1", "--batch-size", "36",
                 "--val-fraction", "0", "--input-size", "32", "--normalize", "imagenet", "--warmup-epochs", "0",
                 "--schedule", "constant", "--lr", str(LR), "--no-progress", *map(str, args)]) == 0
    return load_checkpoint(out / "best.pt")


def initial_weights(spec) -> dict:
    torch.manual_seed(0)  # what training builds before loading the file (--seed 0)
    return spec.build().state_dict()


def test_a_frozen_backbone_keeps_exactly_the_loaded_weights(resnet50_file, small_folder, tmp_path, capsys):
    path, saved = resnet50_file
    spec, trained, _ = train_one_step(small_folder, tmp_path / "run", "--arch", "resnet50_attention",
                                      "--pretrained", path, "--unfreeze", "0:")  # head only: backbone frozen
    assert f"pretrained weights from {path}" in capsys.readouterr().out
    init = initial_weights(spec)
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert set(backbone) == {k for k in saved if not k.startswith("fc.")}
    for key, value in backbone.items():  # BatchNorm statistics included: frozen BatchNorm stays in eval mode
        assert torch.equal(value, saved[key]), key
    assert not torch.equal(init["backbone.conv1.weight"], saved["conv1.weight"])  # the equality above is no accident
    head = [k for k in trained if k.startswith("head.") and trained[k].is_floating_point()
            and not k.endswith(("running_mean", "running_var"))]
    assert any(not torch.equal(trained[k], init[k]) for k in head)  # and the step trained the head


def test_the_whole_model_starts_from_the_file_and_trains(resnet50_file, small_folder, tmp_path):
    path, saved = resnet50_file
    spec, trained, _ = train_one_step(small_folder, tmp_path / "run", "--arch", "resnet50", "--pretrained", path)
    init = initial_weights(spec)
    assert trained["fc.weight"].shape == (3, 2048)  # torchvision's 1000-class fc was skipped
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.conv3.weight"):
        step = (trained[key] - saved[key]).abs().max().item()
        assert 0 < step <= 1.1 * LR, key  # one AdamW step from the file's tensor: at most lr per element
        assert (init[key] - saved[key]).abs().max().item() > 20 * LR, key  # far from the run's own initialisation
