"""Every ``choices`` of the command line is a module constant (training.config, training.__main__)."""
import argparse

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
