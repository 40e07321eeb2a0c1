"""Every ``choices`` of the command line is a module constant (training.config, training.__main__); values
from a --config YAML are checked against their option's type."""
import argparse
import re

import pytest

from inference.tta import TTA_MODES
from training.__main__ import _parser
from training.config import PRESETS, WORKER_STARTS, TrainConfig, add_arguments
from training.evaluation import EVAL_FORMAT_CHOICES
from training.formats import FORMAT_CHOICES, FORMATS
from training.losses import LOSSES
from training.optim import OPTIMIZERS, SCHEDULES
from training.presets import TrainPreset
from training.runtime import AMP_MODES


def _choices(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: tuple(a.choices) for a in parser._actions if a.choices is not None
            and not isinstance(a, argparse._SubParsersAction)}


def test_train_choices_are_the_module_constants():
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert _choices(p) == {"format": FORMAT_CHOICES, "augment": TrainPreset.MODES,
                           "auto_augment": tuple("none" if c is None else c for c in TrainPreset.AUTO_AUGMENT),
                           "loss": LOSSES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp": AMP_MODES,
                           "preset": tuple(PRESETS), "worker_start": WORKER_STARTS}
    assert FORMAT_CHOICES[1:] == FORMATS and EVAL_FORMAT_CHOICES[2:] == FORMATS
    assert TrainConfig(data="d", out="o", auto_augment="none").validate().auto_augment is None


def test_command_choices_are_the_module_constants():
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert _choices(sub["stats"]) == {"format": FORMAT_CHOICES}
    assert _choices(sub["evaluate"]) == {"format": EVAL_FORMAT_CHOICES, "tta": TTA_MODES}
    assert _choices(sub["predict"]) == {"tta": TTA_MODES}


def test_yaml_numbers_are_typed_and_wrong_types_are_one_line(tmp_path):
    """PyYAML reads `lr: 1e-3` as the string '1e-3' (YAML 1.1 wants a dot): AdamW then raised a TypeError
    after the data was loaded."""
    from training.config import TrainConfig, load_yaml
    path = tmp_path / "recipe.yaml"
    path.write_text("data: d\nout: o\nlr: 1e-3\nema_decay: 9.99e-1\nepochs: 3.0\ndevice: cpu\n")
    cfg = TrainConfig(**load_yaml(str(path))).validate()
    assert (cfg.lr, cfg.ema_decay, cfg.epochs) == (0.001, 0.999, 3) and isinstance(cfg.epochs, int)
    for values, message in ((dict(lr="fast"), "lr: expected a number, got 'fast'"),
                            (dict(epochs=2.5), "epochs: expected an integer, got 2.5"),
                            (dict(cache="yes"), "cache: expected true or false, got 'yes'"),
                            (dict(model_kwargs=[16, 32]), "model_kwargs: expected a mapping, got [16, 32]")):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            TrainConfig(data="d", out="o", device="cpu", **values).validate()


def test_balanced_sampler_and_weighted_loss_together_are_refused():
    """Each evens the classes out; together a rare class's share grows as 1/count (100x on a 1000/10 split)."""
    with pytest.raises(ValueError, match="--balanced-sampler and --weighted-loss each even the classes out"):
        TrainConfig.create(data="d", out="o", balanced_sampler=True, weighted_loss=True)
    assert TrainConfig.create(data="d", out="o", weighted_loss=True).weighted_loss


def test_a_config_that_is_not_yaml_is_one_line(tmp_path):
    from training.config import load_yaml
    path = tmp_path / "recipe.yaml"
    path.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not valid YAML: while parsing a flow sequence"):
        load_yaml(str(path))


def test_an_unknown_arch_is_named_as_the_arch_and_cuda_n_under_torchrun_is_refused(monkeypatch):
    from training.distributed import init_distributed
    from training.engine import Trainer
    with pytest.raises(ValueError, match="^--arch foo: unknown architecture 'foo'"):
        Trainer(TrainConfig(data="d", out="o", device="cpu", arch="foo").validate())
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: every rank would take that one GPU
    with pytest.raises(ValueError, match=r"^--device cuda:0 under torchrun: each process takes cuda:LOCAL_RANK"):
        init_distributed("cuda:0")


@pytest.mark.parametrize("values, message", [
    (dict(normalize="0.5,0.5,0.5"), "normalize '0.5,0.5,0.5' has 3 numbers"),
    (dict(normalize="imagnet"), "normalize 'imagnet': expected 'dataset', 'imagenet'"),
    (dict(focal_alpha=0.25), "--focal-alpha is an option of --loss focal, not of --loss ce"),
])
def test_option_mistakes_found_only_after_reading_the_data_are_found_before(values, message):
    """Both were raised after every image was decoded and the statistics computed (--focal-alpha naming the
    loss's Python argument); validate() finds them first."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(data="d", out="o", device="cpu", **values).validate()
    TrainConfig(data="d", out="o", device="cpu", normalize="dataset", loss="focal", focal_alpha=0.25).validate()
