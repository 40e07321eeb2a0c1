"""Atomic checkpoint writes (training.checkpoint.write_atomically): a failure while writing leaves the
previous file loadable and no temporary file behind; the bytes are fsync-ed before the rename."""
from __future__ import annotations

import os

import pytest
import torch

import training.checkpoint as checkpoint
from tests.conftest import CLASSES, TINY_KWARGS
from training.checkpoint import ModelSpec, load_checkpoint, save_checkpoint


def _spec() -> ModelSpec:
    return ModelSpec(arch="cbam_resnet", class_names=CLASSES, input_size=16, resize_size=16, mean=(0.5,) * 3,
                     std=(0.25,) * 3, model_kwargs=TINY_KWARGS)


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    spec = _spec()
    model = spec.build()
    path = tmp_path / "last.pt"
    save_checkpoint(path, spec, model, metrics={"epoch": 1}, extra={"epoch": 1})
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip archive")  # what a crash (disk full, kill) leaves mid-write
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    name, param = next(model.named_parameters())
    with torch.no_grad():
        param.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, spec, model, metrics={"epoch": 2}, extra={"epoch": 2})
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert os.listdir(tmp_path) == ["last.pt"]  # the temporary file is gone
    _, state_dict, ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and ckpt["metrics"] == {"epoch": 1}
    assert not torch.equal(state_dict[name], param.detach())  # the previous weights, not the new ones


def test_the_bytes_are_synced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint.os, "replace",
                        lambda a, b: (calls.append(("replace", os.path.dirname(a) == os.path.dirname(b))),
                                      real_replace(a, b))[1])
    save_checkpoint(tmp_path / "best.pt", _spec(), _spec().build())
    assert calls[:2] == ["fsync", ("replace", True)]  # the file's fsync, a rename within the folder (then the folder's)
    assert load_checkpoint(tmp_path / "best.pt")[0].class_names == CLASSES


class _Payload:
    """Unpickled, it would create ``marker``: what a checkpoint downloaded from a stranger may hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_when_unpickled_is_refused_and_runs_nothing(tmp_path):
    """best.pt for evaluate/predict/export, --resume and --pretrained all load with weights_only=True: a file
    whose pickle calls a function is a one-line ValueError, and the function never runs."""
    from training.finetune import load_pretrained
    from training.models import build_model
    marker = tmp_path / "pwned"
    evil = tmp_path / "best.pt"
    torch.save({"arch": "cbam_resnet", "state_dict": {}, "x": _Payload(marker)}, evil)
    for load in (load_checkpoint, lambda p: checkpoint.read_checkpoint(p, what="--resume"),
                 lambda p: load_pretrained(build_model("cbam_resnet", num_classes=3, **TINY_KWARGS), p)):
        with pytest.raises(ValueError, match="not a (checkpoint written by|torch state dict file)"):
            load(evil)
        assert not marker.exists()
    torch.load(evil, weights_only=False)  # the check of the check: unpickled in full, it runs
    assert marker.exists()
