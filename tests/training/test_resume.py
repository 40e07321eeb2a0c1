"""--resume (training.engine, training.config): refused when the checkpoint does not fit the data and
options, options left off come from the checkpoint, and the continuation is bit-for-bit the
uninterrupted run with every source of randomness on (dropout, augmentation, Mixup/CutMix, EMA)."""
from __future__ import annotations

import argparse
import json
import random
import shutil

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import TINY_KWARGS
from tests.training.conftest import write_shapes
from training.__main__ import main
from training.config import TrainConfig, add_arguments, from_args
from training.engine import Trainer

# Every source of randomness on: dropout (the model's default 0.3), geometric and photometric
# augmentation, Mixup and CutMix on some batches, EMA; a seed other than 0.
RANDOM = dict(augment="pad_crop", hflip=0.5, rotation=10.0, color_jitter=0.3, random_erase=0.3, mixup_alpha=0.4,
              cutmix_alpha=1.0, mix_prob=0.8, ema=True, ema_decay=0.9, seed=5)


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model_kwargs=TINY_KWARGS, input_size=16, batch_size=8, epochs=4,
                val_fraction=0.25, progress=False)
    return TrainConfig(**{**base, **kw})


def _interrupted(cfg: TrainConfig, epochs: int) -> None:
    """The run ``cfg``, stopped (as if killed) after ``epochs`` epochs: last.pt is what it left."""
    t = Trainer(cfg)
    t.begin()
    for epoch in range(1, epochs + 1):
        t.run_epoch(epoch)
    t.finish()


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("variant", ["shuffle", "balanced_sampler", pytest.param("workers", marks=pytest.mark.slow)])
def test_resume_is_bit_exact_with_every_source_of_randomness(small_folder, tmp_path, variant):
    """4 epochs uninterrupted == 2 epochs, a restart, 2 more: torch.equal on weights, EMA, optimizer."""
    kw = dict(RANDOM, balanced_sampler=variant == "balanced_sampler")
    if variant == "workers":  # augmentation in a persistent worker process, whose generator is never saved
        kw.update(workers=1, cache=False)
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(_cfg(small_folder, full, **kw)).run()
    _interrupted(_cfg(small_folder, part, **kw), 2)
    torch.manual_seed(1234)  # whatever the new process's generators hold: last.pt's states replace them
    random.seed(99)
    np.random.seed(7)
    resumed = Trainer(_cfg(small_folder, part, resume=str(part / "last.pt"), **kw))
    assert resumed.start_epoch == 3 and resumed.mixer.enabled
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in resumed.model.modules())
    resumed.run()
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for key in ("state_dict", "ema_state_dict", "optimizer", "rng_states", "sampler_generator"):
        _assert_same_tensors(a[key], b[key], key)
    assert [h["val_top1"] for h in a["history"]] == [h["val_top1"] for h in b["history"]]
    _assert_same_tensors(torch.load(full / "best.pt", weights_only=True)["state_dict"],
                         torch.load(part / "best.pt", weights_only=True)["state_dict"], "best.pt")


def test_resume_without_the_saved_random_states_is_not_exact(small_folder, tmp_path, monkeypatch):
    """The control: the same interrupted run resumed with the generators left as building the run left
    them differs from the uninterrupted one, so the exactness above is the restored states' doing."""
    import training.engine as engine
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(_cfg(small_folder, full, epochs=2, **RANDOM)).run()
    _interrupted(_cfg(small_folder, part, epochs=2, **RANDOM), 1)
    monkeypatch.setattr(engine, "set_rng_state", lambda state: None)
    Trainer(_cfg(small_folder, part, epochs=2, resume=str(part / "last.pt"), **RANDOM)).run()
    a = torch.load(full / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "last.pt", weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def one_epoch_run(small_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_src")
    assert main(["train", "--data", str(small_folder), "--out", str(out), "--model-kwargs", json.dumps(TINY_KWARGS),
                 "--input-size", "16", "--batch-size", "8", "--epochs", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def two_class_folder(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("two_classes"), {"train": 12, "test": 4},
                        classes=("circle", "horizontal"))


@pytest.mark.parametrize("args, message", [
    (["--data", "{two}"], r"the checkpoint's classes \['circle', 'horizontal', 'vertical'\] differ from .*two_classes"
                          r"\w*'s \['circle', 'horizontal'\]"),
    (["--arch", "resnet50"], r"the checkpoint's architecture 'cbam_resnet' differs from --arch 'resnet50'"),
    (["--model-kwargs", json.dumps({**TINY_KWARGS, "head_width": 64})], r"architecture arguments \(--model-kwargs\)"),
    (["--input-size", "20"], r"the checkpoint's input size 16 differs from --input-size 20"),
    (["--resize-size", "18"], r"the checkpoint's resize size 16 differs from this run's 18"),
    (["--normalize", "imagenet"], r"the checkpoint's normalization mean \(.*\) / std \(.*\) differs from this run's "
                                  r"mean \(0\.4850, 0\.4560, 0\.4060\)"),
    (["--normalize", "0.5,0.25"], r"normalization mean .* differs .*--normalize 0\.5,0\.25"),
    (["--val-fraction", "0.3"], r"the checkpoint's validation split \(\d+ images.*\) differs from this run's"),
    (["--optimizer", "sgd"], r"the checkpoint's --optimizer 'adamw' cannot change on --resume \(to 'sgd'\)"),
    (["--backbone-lr-scale", "0.1"], r"the checkpoint's --backbone-lr-scale 1.0 cannot change on --resume"),
], ids=["classes", "arch", "model_kwargs", "input_size", "resize_size", "mean_std_imagenet", "mean_std_explicit",
        "val_split", "optimizer", "backbone_lr_scale"])
def test_a_mismatched_resume_is_refused_with_a_clear_message(one_epoch_run, two_class_folder, tmp_path, args,
                                                             message):
    last = one_epoch_run / "last.pt"
    args = [a.replace("{two}", str(two_class_folder)) for a in args]
    with pytest.raises(ValueError, match=message) as err:
        main(["train", "--resume", str(last), "--out", str(tmp_path / "again"), *args])
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"--resume {last}: the checkpoint's")
    assert not (tmp_path / "again" / "last.pt").exists()


def test_a_new_weight_decay_on_resume_is_the_one_the_optimizer_uses(one_epoch_run, tmp_path):
    """The optimizer's saved state brought back the checkpoint's weight decay over --weight-decay, while the log
    said "options changed"."""
    saved = yaml.safe_load((one_epoch_run / "config.yaml").read_text())
    trainer = Trainer(TrainConfig(**{**saved, "resume": str(one_epoch_run / "last.pt"), "epochs": 2,
                                     "weight_decay": 0.5, "out": str(tmp_path / "again"), "progress": False}))
    decays = sorted({g["weight_decay"] for g in trainer.optimizer.param_groups})
    assert saved["weight_decay"] != 0.5 and decays == [0.0, 0.5]  # norms and biases keep none
    assert trainer.optimizer.state  # the moments themselves came back


def test_resume_from_best_pt_or_a_missing_file_is_refused(one_epoch_run, tmp_path):
    with pytest.raises(ValueError, match="no training state"):
        Trainer(TrainConfig(**{**yaml.safe_load((one_epoch_run / "config.yaml").read_text()),
                               "resume": str(one_epoch_run / "best.pt")}))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        main(["train", "--resume", str(tmp_path / "nope.pt")])


def test_resuming_a_finished_run_asks_for_more_epochs(one_epoch_run, tmp_path):
    """Nothing to train: refused before anything is written (it used to print a best.pt that did not exist)."""
    with pytest.raises(ValueError, match=r"has trained its 1 epochs already; pass --epochs N \(more than 1\)"):
        main(["train", "--resume", str(one_epoch_run / "last.pt"), "--out", str(tmp_path / "again")])
    assert not any((tmp_path / "again").glob("*"))


def test_options_left_off_a_resume_come_from_the_checkpoint(tmp_path):
    """Only what is typed overrides, even a value equal to the default; the rest is the saved run's."""
    saved = TrainConfig(data="d", out="runs/x", epochs=3, lr=1e-3, label_smoothing=0.05, mixup_alpha=0.2,
                        hflip=0.0, cache=False, val_fraction=0.25, seed=3, model_kwargs={"widths": [8]},
                        resume="old/last.pt").to_dict()
    torch.save({"config": saved, "optimizer": {}}, tmp_path / "last.pt")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = from_args(p.parse_args(["--resume", str(tmp_path / "last.pt"), "--epochs", "6", "--label-smoothing", "0.1"]))
    assert (cfg.epochs, cfg.label_smoothing) == (6, 0.1)  # typed (0.1 is also the default)
    assert (cfg.data, cfg.out, cfg.lr, cfg.mixup_alpha, cfg.hflip, cfg.cache, cfg.val_fraction, cfg.seed,
            cfg.model_kwargs) == ("d", str(tmp_path), 1e-3, 0.2, 0.0, False, 0.25, 3, {"widths": [8]})  # out: where
    # the checkpoint is (the run may have moved since it was saved as runs/x)
    assert cfg.resume == str(tmp_path / "last.pt")
    (tmp_path / "c.yaml").write_text("lr: 0.01\n")  # --config sits between the checkpoint and the command line
    cfg = from_args(p.parse_args(["--resume", str(tmp_path / "last.pt"), "--config", str(tmp_path / "c.yaml")]))
    assert (cfg.lr, cfg.epochs, cfg.mixup_alpha) == (0.01, 3, 0.2)


def test_resume_on_the_command_line_keeps_the_runs_options(small_folder, tmp_path, capsys):
    run = tmp_path / "run"
    first = ["--model-kwargs", json.dumps(TINY_KWARGS), "--input-size", "16", "--batch-size", "8", "--epochs", "1",
             "--lr", "1e-3", "--mixup-alpha", "0.2", "--hflip", "0", "--label-smoothing", "0.05",
             "--val-fraction", "0.25", "--seed", "3", "--no-progress"]
    assert main(["train", "--data", str(small_folder), "--out", str(run), *first]) == 0
    assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2"]) == 0  # neither --data nor --out
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at epoch 2" in printed and "random-generator states restored" in printed
    assert "options changed: --epochs 1 -> 2" in printed
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["epochs"], saved["lr"], saved["mixup_alpha"], saved["hflip"], saved["label_smoothing"],
            saved["val_fraction"], saved["seed"], saved["batch_size"], saved["input_size"]) == \
        (2, 1e-3, 0.2, 0.0, 0.05, 0.25, 3, 8, 16)
    assert saved["data"] == str(small_folder) and saved["model_kwargs"] == TINY_KWARGS
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and [h["epoch"] for h in last["history"]] == [1, 2]


def test_a_resume_that_fails_before_its_first_checkpoint_leaves_config_yaml_as_it_was(one_epoch_run, tmp_path,
                                                                                       monkeypatch):
    """config.yaml is the recipe of the folder's last.pt: a resume with new options that failed in its first epoch
    had already written them over it (repeating the run from it then repeated what never trained)."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    before = (run / "config.yaml").read_bytes()
    args = ["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--lr", "0.0123"]

    def fails(self, epoch):
        raise RuntimeError("out of memory")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_one_epoch", fails)
        with pytest.raises(RuntimeError, match="out of memory"):
            main(args)
    assert (run / "config.yaml").read_bytes() == before
    assert main(args) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 0.0123 and saved["epochs"] == 2
