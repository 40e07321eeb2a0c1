"""Fine-tuning helpers for models with a ``backbone`` and a ``head`` (see :mod:`training.models`).

* :func:`param_groups` -- optimizer parameter groups with a smaller learning rate for the backbone
  and no weight decay on biases and normalization weights.
* :class:`ProgressiveUnfreezer` -- train the head first, then unfreeze backbone stages by epoch.
* :func:`parse_schedule` -- ``"2:layer4,4:layer3,6:layer2"`` (a CLI argument) to a schedule.
* :func:`load_pretrained` -- load a local torchvision state dict into ``model.backbone``; never
  downloads anything.

Models without a ``backbone`` attribute (``cbam_resnet``, ``resnet50``) are one parameter group, load
pretrained weights into the whole model, and cannot be progressively unfrozen (a clear ``ValueError``).
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

#: ResNet-style default: head only at first, then the deepest stages one after another.
DEFAULT_SCHEDULE: dict[int, list[str]] = {0: [], 2: ["layer4"], 4: ["layer3"], 6: ["layer2"]}

#: Schedule entry that unfreezes the whole backbone (stem and ``layer1`` included).
ALL_STAGES = "all"


def _backbone(model: nn.Module) -> nn.Module | None:
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else None


def param_groups(model: nn.Module, *, lr: float, backbone_lr_scale: float = 0.1, weight_decay: float = 0.0,
                 no_decay_norm_and_bias: bool = True) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW(param_groups(model, lr=...))``.

    Backbone parameters get ``lr * backbone_lr_scale``, everything else (the head) ``lr``. With
    ``no_decay_norm_and_bias`` the one-dimensional parameters (biases, BatchNorm/LayerNorm weights) go
    to a group with ``weight_decay=0``. Every group carries a ``name`` (``backbone``, ``backbone_no_decay``,
    ``head``, ``head_no_decay``; ``all`` / ``all_no_decay`` for a model without a backbone); empty groups
    are left out. Frozen parameters are included, so stages unfrozen later are trained by the same
    optimizer (AdamW skips parameters whose gradient is ``None``).
    """
    backbone = _backbone(model)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups: dict[str, dict] = {}
    for param in model.parameters():  # each shared tensor once
        part = "all" if backbone is None else ("backbone" if id(param) in backbone_ids else "head")
        no_decay = no_decay_norm_and_bias and param.ndim <= 1
        name = f"{part}_no_decay" if no_decay else part
        if name not in groups:
            group_lr = lr * backbone_lr_scale if part == "backbone" else lr
            groups[name] = {"name": name, "params": [], "lr": group_lr,
                            "weight_decay": 0.0 if no_decay else weight_decay}
        groups[name]["params"].append(param)
    order = ["backbone", "backbone_no_decay", "head", "head_no_decay", "all", "all_no_decay"]
    return [groups[name] for name in order if name in groups]


def parse_schedule(text: str) -> dict[int, list[str]]:
    """``"2:layer4,4:layer3,6:layer2"`` -> ``{2: ["layer4"], 4: ["layer3"], 6: ["layer2"]}``.

    A repeated epoch collects its stages (``"2:layer4,2:layer3"``); ``"0:"`` is an epoch that
    unfreezes nothing. An empty string is the empty schedule (the backbone stays frozen).
    """
    schedule: dict[int, list[str]] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        epoch_text, sep, stage = (s.strip() for s in entry.partition(":"))
        if not sep or not epoch_text.isdigit():
            raise ValueError(f"bad unfreeze schedule entry {entry!r}: expected EPOCH:STAGE, e.g. '2:layer4'")
        stages = schedule.setdefault(int(epoch_text), [])
        if stage:
            stages.append(stage)
    return dict(sorted(schedule.items()))


class ProgressiveUnfreezer:
    """Freeze ``model.backbone`` and unfreeze its stages (direct children such as ``layer4``) by epoch.

    ``schedule`` maps an epoch to the stage names unfrozen from that epoch on (:data:`ALL_STAGES`
    unfreezes every stage); the head is always trainable. Construction freezes the backbone, then
    ``apply(epoch)`` unfreezes every stage scheduled at or before ``epoch`` (so resuming at a later
    epoch catches up) and returns the newly unfrozen names. Epochs are counted as the training loop
    counts them.

    BatchNorm layers of frozen stages are kept in eval mode, so their running statistics stay those
    of the pretrained weights. ``model.train()`` would switch them back, so the loop calls
    :meth:`set_train_mode` instead of (or right after) ``model.train()``::

        unfreezer = ProgressiveUnfreezer(model, schedule=parse_schedule(args.unfreeze))
        for epoch in range(epochs):
            unfreezer.apply(epoch)
            unfreezer.set_train_mode()
            ...
    """

    def __init__(self, model: nn.Module, *, schedule: Mapping[int, Sequence[str]] | None = None):
        backbone = _backbone(model)
        if backbone is None:
            raise ValueError(f"progressive unfreezing needs a model with a `backbone` attribute; "
                             f"{type(model).__name__} has none")
        self.model = model
        self.backbone = backbone
        self.schedule = {int(epoch): list(stages) for epoch, stages in
                         sorted((DEFAULT_SCHEDULE if schedule is None else schedule).items())}
        self.stages = dict(backbone.named_children())
        unknown = sorted({s for stages in self.schedule.values() for s in stages} - set(self.stages) - {ALL_STAGES})
        if unknown:
            raise ValueError(f"unknown backbone stage(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(self.stages)} or {ALL_STAGES!r}")
        self.unfrozen: list[str] = []
        backbone.requires_grad_(False)
        if model.training:
            self.set_train_mode()

    def apply(self, epoch: int) -> list[str]:
        """Unfreeze the stages scheduled at or before ``epoch``; return those not unfrozen before."""
        newly: list[str] = []
        for start, stages in self.schedule.items():
            if start > epoch:
                break
            for stage in stages:
                names = list(self.stages) if stage == ALL_STAGES else [stage]
                for name in names:
                    if name not in self.unfrozen:
                        self.stages[name].requires_grad_(True)
                        self.unfrozen.append(name)
                        newly.append(name)
        if self.model.training:
            self.set_train_mode()
        return newly

    def frozen_stages(self) -> list[str]:
        return [name for name in self.stages if name not in self.unfrozen]

    def set_train_mode(self, mode: bool = True) -> nn.Module:
        """``model.train(mode)``, then put the BatchNorm layers of frozen stages back in eval mode."""
        self.model.train(mode)
        if mode:
            for name in self.frozen_stages():
                for module in self.stages[name].modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self.model


_IGNORED_PREFIXES = ("fc.",)  # torchvision's 1000-class classifier


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a checkpoint wrapping its weights (this project's format among them)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of parameter name -> tensor)")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP-saved weights


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, partial: bool = False, min_match: float = 0.5,
                    ignore_prefixes: Iterable[str] = _IGNORED_PREFIXES) -> dict[str, list[str]]:
    """Load a local (torchvision) state dict into ``model.backbone``, or the whole model without one.

    Keys starting with ``ignore_prefixes`` (torchvision's ``fc.*``) are not loaded. A checkpoint of this
    project's backbone models (keys ``backbone.*`` and ``head.*``) gives its backbone. Returns ``{"loaded",
    "missing", "unexpected", "skipped"}`` (lists of key names): copied; in the model but not in the file; in
    the file but not in the model; in the file but ignored or of another shape.

    The file must be of the model's architecture: a tensor of another shape (a ResNeXt of other groups), one
    the model lacks (a deeper ResNet's extra blocks) or one the file lacks (but for the modules the model adds
    to torchvision's blocks, ``added_modules``: SE gates, reported missing) is a ``ValueError`` naming them,
    since loading the rest would leave those layers random without a word. ``partial``: load what matches
    anyway (a grayscale stem, a shallower donor), refused only when the matching tensors hold less than
    ``min_match`` of the target's elements. ``FileNotFoundError`` for a missing file, ``ValueError`` when it is
    not a state dict. Loads with ``weights_only=True``; never downloads.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path} (nothing is downloaded; "
                                f"save a torchvision state dict there first)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"{path} is not a torch state dict file: {exc}") from exc
    state = _unwrap_state_dict(obj, path)
    backbone = _backbone(model)
    target = model if backbone is None else backbone
    ignore = tuple(ignore_prefixes)
    if backbone is not None and any(k.startswith("backbone.") for k in state):  # this project's checkpoint
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        ignore += ("head.",)
    own = target.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "missing": [], "unexpected": [], "skipped": []}
    to_load, other_shape = {}, []
    for key, tensor in state.items():
        if key.startswith(ignore):
            report["skipped"].append(key)
        elif key not in own:
            report["unexpected"].append(key)
        elif tensor.shape != own[key].shape:
            report["skipped"].append(key)
            other_shape.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        else:
            to_load[key] = tensor
    report["loaded"] = sorted(to_load)
    report["missing"] = sorted(set(own) - set(state))
    added = tuple(getattr(target, "added_modules", ()))  # modules the model adds to torchvision's (SE gates)
    lacking = [k for k in report["missing"] if not any(f".{a}." in f".{k}" for a in added)  # BatchNorm's step
               and not k.endswith("num_batches_tracked")]  # counters: files from before PyTorch 0.4.1 have none
    report["unexpected"].sort()
    report["skipped"].sort()
    kind = type(target).__name__
    if not partial and (other_shape or report["unexpected"] or lacking):
        problems = [f"{len(v)} {what}, e.g. {', '.join(v[:3])}" for what, v in (
            ("of another shape", other_shape), ("the model lacks", report["unexpected"]),
            ("the file lacks", lacking)) if v]
        raise ValueError(f"{path} is not a {kind} of this architecture: tensors {'; '.join(problems)}. Use the "
                         "weights of the same architecture, or --pretrained-partial to load what matches (the rest "
                         "stays random)")
    matched = sum(t.numel() for k, t in to_load.items() if not k.endswith("num_batches_tracked"))
    wanted = sum(t.numel() for k, t in own.items() if not k.endswith("num_batches_tracked"))
    if matched < min_match * wanted:
        raise ValueError(f"{path} matches only {matched:,} of the {wanted:,} weights of {kind} (at least "
                         f"{min_match:.0%} needed): is it the right architecture? missing e.g. "
                         f"{report['missing'][:3]}, unexpected e.g. {report['unexpected'][:3]}, skipped e.g. "
                         f"{report['skipped'][:3]}")
    target.load_state_dict(to_load, strict=False)
    return report
