"""training.config presets: ``--preset photo`` sets the photo defaults, and options given still override them."""
import argparse
from dataclasses import fields

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import encode
from training.__main__ import _parser
from training.config import DEFAULT_PRESET, PRESETS, TrainConfig, add_arguments, from_args, resume_config
from training.engine import Trainer, train_preset
from training.stats import IMAGENET_MEAN, IMAGENET_STD

PHOTO = {"input_size": 224, "resize_size": 256, "augment": "random_resized_crop", "hflip": 0.5, "color_jitter": 0.4,
         "cache": False, "normalize": "imagenet", "batch_size": 32}


def config(*argv) -> TrainConfig:
    return from_args(_parser().parse_args(["train", "--data", "d", "--out", "o", *map(str, argv)]))


def step_names(cfg: TrainConfig) -> list[str]:
    return [s.split("(")[0] for s in train_preset(cfg).describe()]


def test_every_preset_names_fields_and_validates():
    names = {f.name for f in fields(TrainConfig)}
    for name, values in PRESETS.items():
        assert set(values) <= names, name
        assert TrainConfig.create(data="d", out="o", preset=name).preset == name
    assert PRESETS["photo"] == PHOTO and PRESETS[DEFAULT_PRESET] == {}
    p = argparse.ArgumentParser()
    add_arguments(p)
    preset = next(a for a in p._actions if a.dest == "preset")
    assert tuple(preset.choices) == tuple(PRESETS)  # --preset offers exactly the presets


def test_photo_preset_reaches_the_config_and_the_train_transform():
    cfg = config("--preset", "photo")
    assert {k: getattr(cfg, k) for k in PHOTO} == PHOTO and cfg.preset == "photo"
    assert step_names(cfg) == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]
    steps = train_preset(cfg).describe()
    assert "size=(224, 224)" in steps[0] and steps[1] == "RandomHorizontalFlip(p=0.5)"
    assert "brightness=(0.6, 1.4)" in steps[2] and "saturation=(0.6, 1.4)" in steps[2]
    assert TrainConfig.create(data="d", out="o", preset="photo") == cfg  # the Python way applies it too
    # the default is today's small-image configuration, unchanged
    small = config()
    assert small == TrainConfig(data="d", out="o").validate() and small.preset == DEFAULT_PRESET
    assert (small.input_size, small.augment, small.cache) == (32, "pad_crop", True)
    assert step_names(small) == ["RandomCrop", "RandomHorizontalFlip"]  # the cache ran the evaluation resize/crop


def test_options_given_override_the_preset(tmp_path):
    cfg = config("--preset", "photo", "--input-size", 160)
    assert cfg.input_size == 160 and cfg.resize_size == 256 and cfg.augment == "random_resized_crop"
    assert "size=(160, 160)" in train_preset(cfg).describe()[0]
    cfg = config("--preset", "photo", "--augment", "pad_crop", "--cache", "--color-jitter", 0, "--batch-size", 8)
    assert (cfg.augment, cfg.cache, cfg.color_jitter, cfg.batch_size, cfg.input_size) == ("pad_crop", True, 0.0, 8, 224)
    assert step_names(cfg) == ["RandomCrop", "RandomHorizontalFlip"]  # not the 256/224 resize again (a zoom)
    assert step_names(config("--preset", "photo", "--augment", "pad_crop")) == [
        "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "ColorJitter"]  # no cache: from the file
    # --config: the preset under the file's values, the command line over both
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "photo", "input_size": 192, "batch_size": 16}))
    cfg = config("--config", path, "--batch-size", 4)
    assert (cfg.input_size, cfg.resize_size, cfg.batch_size, cfg.cache) == (192, 256, 4, False)
    # the resolved configuration saved as RUN/config.yaml gives the same run back
    saved = tmp_path / "config.yaml"
    cfg.save_yaml(str(saved))
    assert config("--config", saved) == cfg


def test_resume_keeps_the_runs_values_and_a_new_preset_applies(tmp_path):
    run = TrainConfig.create(data="d", out="o", preset="photo", input_size=160)
    ckpt = tmp_path / "last.pt"
    torch.save({"config": run.to_dict()}, ckpt)
    assert resume_config(str(ckpt), {}).input_size == 160  # left off: the run's value
    assert resume_config(str(ckpt), {"preset": "photo"}).input_size == 160  # the run's own preset: nothing changes
    small = tmp_path / "small.pt"
    torch.save({"config": TrainConfig.create(data="d", out="o").to_dict()}, small)
    moved = resume_config(str(small), {"preset": "photo", "batch_size": 4})
    assert (moved.input_size, moved.cache, moved.batch_size) == (224, False, 4)


def test_an_unknown_preset_is_refused():
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "huge"])
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.create(data="d", out="o", preset="huge")


@pytest.fixture()
def photo_folder(tmp_path):
    """3 classes x 4 train / 2 test JPEGs of 300x260, flat colours with noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for k, c in enumerate(("red", "green", "blue")):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (260, 300, 3)).astype(np.uint8)
                img[..., k] += 180
                (tmp_path / split / c / f"{i}.jpg").write_bytes(encode(img, "JPEG", quality=90))
    return tmp_path


def test_a_photo_run_decodes_per_access_and_crops_224(photo_folder, tmp_path):
    cfg = TrainConfig.create(data=str(photo_folder), out=str(tmp_path / "run"), preset="photo", val_fraction=0,
                             model_kwargs={"widths": [8, 8, 16, 16], "head_width": 32}, progress=False)
    trainer = Trainer(cfg)
    assert trainer.splits.train.cache is None  # nothing decoded into memory
    assert (trainer.eval_preset.crop_size, trainer.eval_preset.resize_size) == (224, 256)
    assert tuple(trainer.mean) == IMAGENET_MEAN and tuple(trainer.std) == IMAGENET_STD
    assert "RandomResizedCrop(size=(224, 224)" in repr(trainer.train_ds.transform)
    image, label, bad = trainer.train_ds[(0, 0)]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8 and bad == []
    assert (trainer.spec.input_size, trainer.spec.resize_size) == (224, 256)  # what export and the handler get
