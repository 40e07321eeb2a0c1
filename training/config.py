"""The training configuration: one dataclass, loadable from YAML, overridable from the command line.

Precedence: the dataclass defaults < the named preset (``--preset``, :data:`PRESETS`) < ``--config
FILE.yaml`` < options given on the command line. The default preset ``small`` is the dataclass itself
(small images: 32 px, pad-and-crop, in-memory cache); ``photo`` sets what photos need (224 px crops
of a 256 px resize, random resized crops, flips, colour jitter, ImageNet mean/std, no cache, batch
32), and every option given still overrides it: ``--preset photo --input-size 160``. With ``--resume
CHECKPOINT`` the checkpoint's saved configuration comes between the defaults and ``--config``: options
left off the resume command keep the run's values (:func:`resume_config`), a preset among them.
:meth:`TrainConfig.create` applies the preset as the command line does (``TrainConfig(...)`` itself
takes its values as given).
The resolved configuration is saved as ``RUN/config.yaml`` and inside every checkpoint, so a run can
be repeated (``python -m training train --config RUN/config.yaml``) and resumed.

Every field carries its ``--help`` text in ``metadata["help"]``; the CLI is generated from them, so
the options, their defaults and the YAML keys are always the same names (``--mixup-alpha`` is
``mixup_alpha`` in YAML).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import yaml

from inference.atomic import write_bytes

from .formats import AUTO, FORMAT_CHOICES
from .losses import LOSSES
from .optim import OPTIMIZERS, SCHEDULES
from .presets import TrainPreset
from .runtime import AMP_MODES, check_device
from .stats import parse_normalize

#: Options of one invocation, not of the recipe: kept out of ``RUN/config.yaml`` (repeating a run from it must
#: not resume or replace another) and never taken from a checkpoint's saved configuration.
INVOCATION_ONLY = ("resume", "force")

#: How DataLoader workers start (``--worker-start``); see ``Trainer.__init__``.
WORKER_STARTS = ("forkserver", "fork")


def _opt(default, help: str, **extra) -> Any:
    return field(default=default, metadata={"help": help, **extra})


#: Named sets of defaults (``--preset NAME``): field name -> value, over the dataclass defaults and under
#: ``--config`` and the command line. ``photo``: the ImageNet recipe of torchvision's references
#: (RandomResizedCrop 224 of the image, flip; evaluation Resize 256 + CenterCrop 224), with timm's colour
#: jitter 0.4 added, ImageNet mean/std as
#: torchvision's pretrained weights expect), decoded per access (the cache would keep only the centre
#: crop) and a batch that fits ResNet-50 at 224 px in memory.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {},
    "photo": {"input_size": 224, "resize_size": 256, "augment": "random_resized_crop", "hflip": 0.5,
              "color_jitter": 0.4, "cache": False, "normalize": "imagenet", "batch_size": 32},
}
DEFAULT_PRESET = "small"


def _describe_presets() -> str:
    def flag(name: str, value) -> str:
        if isinstance(value, bool):
            return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
        return f"--{name.replace('_', '-')} {value}"
    return "; ".join(f"{name}: " + (", ".join(flag(k, v) for k, v in values.items()) or "the defaults shown here")
                     for name, values in PRESETS.items())


@dataclass
class TrainConfig:
    # -- data
    preset: str = _opt(DEFAULT_PRESET, "named defaults (" + _describe_presets() + "); options given on the "
                       "command line or in --config override the preset's", choices=tuple(PRESETS))
    data: str = _opt(None, "data set root: an ImageFolder tree (train/ + test/ or val/), an iNaturalist-style "
                     "folder (train.json + val.json) or CIFAR-10/100 python pickles")
    out: str = _opt(None, "run folder, e.g. runs/NAME: best.pt, last.pt, config.yaml, log.csv (per epoch, "
                    "validation split), test_metrics.json (test split, once, at the end)")
    format: str = _opt(AUTO, "data format", choices=FORMAT_CHOICES)
    input_size: int = _opt(32, "model input size in pixels (the evaluation center crop)", minimum=1)
    resize_size: int | None = _opt(None, "shorter side before the evaluation crop (default: the input size)", minimum=1)
    normalize: str = _opt("dataset", "mean/std fused into the exported graph: 'dataset' (computed on the "
                          "training images), 'imagenet', or 'M1,M2,M3,S1,S2,S3'")
    workers: int = _opt(0, "DataLoader worker processes (persistent; pinned memory on CUDA)", minimum=0)
    worker_start: str = _opt("forkserver", "how the workers start: forkserver (safe when this process has other "
                             "threads; a script that builds the Trainer itself needs the `if __name__ == "
                             "'__main__':` guard) or fork (no guard needed; may hang or crash with threads: gRPC, "
                             "ONNX Runtime, OpenVINO)", choices=WORKER_STARTS)
    cache: bool = _opt(True, "decode every image once into memory (turn off with --no-cache for large data sets)")
    balanced_sampler: bool = _opt(False, "sample classes equally often (weights 1/class frequency; single process)")
    val_fraction: float = _opt(0.1, "fraction of the training images held out (stratified by class, seeded by "
                               "--seed) as the validation split that chooses best.pt, unless an ImageFolder root "
                               "has val/ next to test/ (then val/ is it); 0: no validation split, best.pt is the "
                               "last epoch (EMA weights with --ema). The test split is never read for this: it is "
                               "evaluated once, at the end", minimum=0, below=1)
    max_bad_images: int = _opt(10, "unreadable training images (not an image, truncated, unreadable file) skipped "
                               "with a warning naming each and counted in the log; one more is an error", minimum=0)
    # -- augmentation (training.presets.TrainPreset) and batch mixing (training.mixing.BatchMixer)
    augment: str = _opt("pad_crop", "geometric augmentation: pad-and-crop (small images), random-resized-crop "
                        "(large images) or none", choices=TrainPreset.MODES)
    hflip: float = _opt(0.5, "horizontal flip probability", minimum=0, maximum=1)
    rotation: float = _opt(0.0, "random rotation range in degrees (0: off)", minimum=0, maximum=180)
    color_jitter: float = _opt(0.0, "ColorJitter strength for brightness/contrast/saturation (0: off)", minimum=0)
    affine: float = _opt(0.0, "RandomAffine translate/scale strength (0: off)", minimum=0, below=1)
    auto_augment: str | None = _opt(None, "automatic augmentation policy", choices=TrainPreset.AUTO_AUGMENT)
    random_erase: float = _opt(0.0, "RandomErasing probability (0: off)", minimum=0, maximum=1)
    mixup_alpha: float = _opt(0.0, "Mixup Beta(alpha, alpha) parameter (0: off)", minimum=0)
    cutmix_alpha: float = _opt(0.0, "CutMix Beta(alpha, alpha) parameter (0: off)", minimum=0)
    mix_prob: float = _opt(1.0, "probability that a batch is mixed (when mixup/cutmix are on)", minimum=0, maximum=1)
    mix_switch_prob: float = _opt(0.5, "probability of CutMix instead of Mixup when both are on", minimum=0, maximum=1)
    # -- model
    arch: str = _opt("cbam_resnet", "architecture from the registry (see the list above)")
    model_kwargs: dict = _opt(None, "JSON keyword arguments of the architecture, e.g. "
                              "'{\"widths\": [16, 32, 64, 128], \"head_width\": 256}'", parse=json.loads)
    pretrained: str | None = _opt(None, "local torchvision state dict to start the backbone from (never "
                                  "downloaded), of the backbone's architecture; otherwise training starts from "
                                  "scratch")
    pretrained_partial: bool = _opt(False, "load the --pretrained tensors that match and leave the others random "
                                    "(a grayscale stem, a shallower donor) instead of refusing the file")
    sync_bn: bool = _opt(False, "convert BatchNorm to SyncBatchNorm under torchrun (DDP)")
    # -- loss
    loss: str = _opt("ce", "loss function", choices=LOSSES)
    label_smoothing: float = _opt(0.1, "label smoothing of the targets", minimum=0, below=1)
    focal_gamma: float = _opt(2.0, "focal loss focusing parameter gamma", minimum=0)
    focal_alpha: float | None = _opt(None, "focal loss alpha (default: none). In a softmax loss over classes a scalar "
                                     "only scales the loss (Lin et al.'s alpha weighs positives against negatives "
                                     "of a sigmoid): it changes SGD's step, not the balance; for that use "
                                     "--weighted-loss", minimum=0, maximum=1)
    weighted_loss: bool = _opt(False, "weight classes by inverse training-set frequency, averaging 1 over the "
                               "samples (scikit-learn's 'balanced')")
    # -- optimisation
    optimizer: str = _opt("adamw", "optimizer (sgd = SGD with Nesterov momentum)", choices=OPTIMIZERS)
    epochs: int = _opt(10, "number of epochs", minimum=1)
    batch_size: int = _opt(128, "images per step (per process under torchrun)", minimum=1)
    lr: float = _opt(2e-3, "peak learning rate (of the head when --backbone-lr-scale is set)", minimum=0)
    weight_decay: float = _opt(0.05, "weight decay (not applied to norm layers and biases)", minimum=0)
    momentum: float = _opt(0.9, "SGD momentum", minimum=0, below=1)
    schedule: str = _opt("cosine", "learning-rate schedule (after warm-up)", choices=SCHEDULES)
    warmup_epochs: float = _opt(0.2, "linear warm-up length in (fractional) epochs", minimum=0)
    min_lr_ratio: float = _opt(0.0, "cosine floor as a fraction of --lr", minimum=0, maximum=1)
    restart_epochs: int = _opt(10, "cosine_restarts: epochs of the first cycle", minimum=1)
    restart_mult: int = _opt(1, "cosine_restarts: each cycle this many times the one before", minimum=1)
    plateau_patience: int = _opt(2, "plateau: epochs without improvement before the lr drops", minimum=0)
    plateau_factor: float = _opt(0.1, "plateau: the lr is multiplied by this when it drops", minimum=0, below=1)
    step_epochs: int = _opt(30, "step: the lr is multiplied by --step-gamma every this many epochs", minimum=1)
    step_gamma: float = _opt(0.1, "step: the factor of each drop", minimum=0, maximum=1)
    grad_clip: float = _opt(0.0, "clip the gradient norm to this value (0: off)", minimum=0)
    backbone_lr_scale: float = _opt(1.0, "learning rate of the backbone relative to the head "
                                    "(differential learning rates; models with a backbone/head split)", minimum=0)
    unfreeze: str | None = _opt(None, "progressive unfreezing schedule 'EPOCH:STAGE,...', e.g. "
                                "'0:,2:layer4,4:layer3,6:layer2' (head only until epoch 2); epochs count from 0")
    ema: bool = _opt(False, "keep an exponential moving average of the weights, evaluated and checkpointed")
    ema_decay: float = _opt(0.999, "EMA decay per optimizer step", minimum=0, below=1)
    early_stopping: int = _opt(0, "stop after this many epochs without a better validation top-1 (0: off; "
                               "needs a validation split)", minimum=0)
    # -- execution
    amp: str = _opt("auto", "autocast precision: auto = bf16 on CUDA, none on CPU", choices=AMP_MODES)
    channels_last: bool | None = _opt(None, "channels_last memory format (default: on for CUDA)")
    compile: bool = _opt(False, "torch.compile the model")
    seed: int = _opt(0, "random seed (weights, data order, augmentation)")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, ... (under torchrun: cuda:LOCAL_RANK)")
    resume: str | None = _opt(None, "continue exactly from a checkpoint (RUN/last.pt): weights, optimizer, "
                              "schedule, AMP scaler, EMA, early stopping, epoch and random-generator states. "
                              "Options left off come from the checkpoint's saved configuration, options given "
                              "override it (e.g. --epochs, --lr); a different architecture, class list, input "
                              "size or mean/std is refused")
    force: bool = _opt(False, "replace the run that --out already holds (best.pt, last.pt, log.csv, "
                       "test_metrics.json, config.yaml, tensorboard/ and eval/ wait in OUT/.replaced/ until the new "
                       "run's first checkpoint, and are put back if it fails first); without it such an --out is "
                       "refused, as is one holding a config.yaml alone or a log.csv that is no training log")
    tensorboard: bool = _opt(False, "also log scalars to RUN/tensorboard (needs the tensorboard package)")
    progress: bool = _opt(True, "progress bars (turn off with --no-progress)")

    def validate(self) -> "TrainConfig":
        for f in fields(self):  # values from a --config YAML or from Python arrive with any type
            setattr(self, f.name, _typed(f, getattr(self, f.name)))
        if not self.data:
            raise ValueError("--data is required (or 'data:' in the --config file)")
        if not self.out:
            raise ValueError("--out is required (or 'out:' in the --config file)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and None in choices and getattr(self, f.name) in ("none", "None", ""):
                setattr(self, f.name, None)
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: {getattr(self, f.name)!r} is not one of {choices}")
        for f in fields(self):
            check_range(f, getattr(self, f.name))
        if self.resize_size is not None and self.resize_size < self.input_size:
            raise ValueError(f"--resize-size {self.resize_size} is smaller than --input-size {self.input_size}: the "
                             "evaluation crop is cut from the resized image (the rest would be black padding)")
        if self.focal_alpha is not None and self.loss != "focal":
            raise ValueError(f"--focal-alpha is an option of --loss focal, not of --loss {self.loss} (class weights: "
                             "--weighted-loss)")
        parse_normalize(self.normalize, dataset_stats_fn=lambda: ((0.5,) * 3, (0.5,) * 3))  # a typo: before the data
        if self.balanced_sampler and self.weighted_loss:  # each alone evens the classes out; both: 1/n twice
            raise ValueError("--balanced-sampler and --weighted-loss each even the classes out; together a rare class "
                             "counts twice over (its share grows as 1/count): use one")
        if os.environ.get("WORLD_SIZE", "1") == "1":  # under torchrun each rank's device is checked as it starts
            check_device(self.device)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)")
        return self

    @classmethod
    def create(cls, **values) -> "TrainConfig":
        """The validated configuration of ``values`` over their preset's (``preset=``), as the command line
        builds it: ``TrainConfig.create(data=..., out=..., preset="photo", input_size=160)``."""
        return cls(**with_preset(values)).validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def save_yaml(self, path: str) -> None:
        """The recipe, to repeat the run with ``--config``: every option but :data:`INVOCATION_ONLY`."""
        values = {k: v for k, v in self.to_dict().items() if k not in INVOCATION_ONLY}
        write_bytes(path=path, data=yaml.safe_dump(values, sort_keys=False, allow_unicode=True).encode())


def _range_text(meta) -> str:
    """A field's limits in words (``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive)."""
    low = (f"at least {meta['minimum']}" if "minimum" in meta else f"above {meta['above']}" if "above" in meta else "")
    high = (f"at most {meta['maximum']}" if "maximum" in meta else f"below {meta['below']}" if "below" in meta else "")
    return " and ".join(r for r in (low, high) if r)


def check_range(f, value) -> None:
    """``ValueError`` naming the option when a number is outside its field's limits, or not finite."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    meta = f.metadata
    fits = (math.isfinite(value) and value >= meta.get("minimum", -math.inf) and value > meta.get("above", -math.inf)
            and value <= meta.get("maximum", math.inf) and value < meta.get("below", math.inf))
    if not fits:
        rule = " and ".join(r for r in ("a finite number" if not math.isfinite(value) else "", _range_text(meta)) if r)
        raise ValueError(f"--{f.name.replace('_', '-')} must be {rule}, not {value}")


def _typed(f, value):
    """``value`` as field ``f``'s annotated type (``float``, ``int | None``, ...): YAML reads ``1e-3`` as a
    string and ``8.0`` as a float; anything that is not such a value is a ``ValueError`` naming the option."""
    kinds = str(f.type).split(" | ")
    if value is None and ("None" in kinds or f.default is None or None in (f.metadata.get("choices") or ())):
        return None
    kind = kinds[0]
    if kind == "float" and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind == "int" and not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    elif kind == "bool" and isinstance(value, bool):
        return value
    elif kind == "str" and isinstance(value, str):
        return value
    elif kind == "str" and not isinstance(value, bool) and isinstance(value, (int, float)):
        return str(value)  # e.g. "device: 0" or "unfreeze: 0"
    elif kind == "dict" and isinstance(value, dict):
        return value
    expected = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
                "dict": "a mapping"}.get(kind, kind)
    raise ValueError(f"{f.name}: expected {expected}, got {value!r}")


def load_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return values


def _bool_field(f) -> bool:
    return f.type in ("bool", "bool | None", bool)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per field; defaults are SUPPRESSed so that only what the user typed overrides."""
    parser.add_argument("--config", default=None, help="YAML file of options (keys as below, with underscores); "
                        "options on the command line override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        limits = _range_text(f.metadata)
        help_text = f"{f.metadata['help']} (default: {default}{'; ' + limits if limits else ''})"
        if _bool_field(f):
            parser.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        kind = f.metadata.get("parse") or {"int": int, "float": float, "int | None": int,
                                            "float | None": float}.get(str(f.type), str)
        choices = f.metadata.get("choices")
        # None (off) is typed as "none" on the command line; validate() turns it back into None
        kwargs = {"choices": tuple("none" if c is None else c for c in choices)} if choices else {}
        parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text, **kwargs)


def saved_config(checkpoint: str) -> dict:
    """The training configuration saved in ``checkpoint`` (``RUN/last.pt``), without its ``resume``;
    options this version no longer has are dropped, options it added keep their defaults."""
    from .checkpoint import read_checkpoint
    from .run_folder import restore_killed_run

    restore_killed_run(os.path.dirname(checkpoint) or ".")  # its last.pt may wait in RUN/.replaced/
    saved = read_checkpoint(checkpoint, what="--resume").get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {checkpoint}: the checkpoint holds no training configuration (not written by "
                         "python -m training train)")
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in saved.items() if k in names and k not in INVOCATION_ONLY}


def resume_config(checkpoint: str, given: dict | None = None) -> TrainConfig:
    """The configuration of ``--resume checkpoint``: the checkpoint's saved one, overridden by the
    options in ``given`` (those given on the command line or in ``--config``), and nothing else:
    an option left off keeps the run's value, not the default, but for ``out``: the checkpoint's folder.
    The run's preset is in its saved values; a different ``preset`` given applies that preset's values,
    under the other options given."""
    saved, given = saved_config(checkpoint), dict(given or {})
    if "preset" in given and given["preset"] != saved.get("preset", DEFAULT_PRESET):
        given = with_preset(given)
    if given.get("out") is None:  # the run goes on where its checkpoint is (a run folder may have moved)
        given["out"] = os.path.dirname(checkpoint) or "."
    return TrainConfig(**{**saved, **given, "resume": checkpoint}).validate()


def with_preset(values: dict) -> dict:
    """``values`` over the values of the preset they name (``values["preset"]``, else :data:`DEFAULT_PRESET`)."""
    name = values.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not one of {tuple(PRESETS)}")
    return {**PRESETS[name], **values}


def from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})  # only typed options (SUPPRESS)
    if values.get("resume"):
        return resume_config(values["resume"], values)
    return TrainConfig.create(**values)

