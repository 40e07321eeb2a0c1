"""Optimizers, learning-rate schedules and early stopping.

:func:`build_optimizer` makes AdamW or SGD from a module (norm and bias parameters without weight
decay), a parameter iterable, or parameter-group dicts (differential learning rates).

:func:`build_schedule` returns a :class:`Schedule`: one interface for per-step and per-epoch
schedules. Call ``step_batch()`` after every optimizer step and ``step_epoch(metric)`` once per
epoch. Every schedule starts with a linear warm-up of ``warmup_epochs`` (fractional, counted in
steps). The schedules are multiplicative factors of each group's own initial lr, so differential
learning rates keep their ratios:

* ``cosine``          -- cosine from 1 to ``min_lr_ratio`` over the steps after warm-up
* ``cosine_restarts`` -- SGDR: cosine cycles of ``restart_epochs`` (times ``restart_mult`` per cycle)
* ``step``            -- ``step_gamma ** (epoch // step_epochs)``, epochs counted from the start
* ``constant``        -- 1 after warm-up
* ``plateau``         -- ``ReduceLROnPlateau`` (mode max) on the epoch metric, after warm-up: the lrs
  are multiplied by ``plateau_factor`` once MORE than ``plateau_patience`` epochs in a row did not
  improve (torch's convention), never below ``min_lr_ratio`` times the group's initial lr

The factor schedules run on ``LambdaLR``. ``CosineAnnealingWarmRestarts`` is not used because its
``eta_min`` is one absolute lr for every group, which breaks per-group scaling with
``min_lr_ratio > 0``; :func:`cosine_restarts_factor` reproduces its curve as a factor (tested
against it).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "cosine_restarts", "plateau", "step", "constant")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
              *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def split_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)`` trainable parameters of ``module``: biases, 0/1-D tensors and the
    parameters of normalization layers go to ``no_decay``. Shared parameters are listed once."""
    decay, no_decay, seen = [], [], set()
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(mod, NORM_TYPES) or name.endswith("bias") or p.ndim <= 1 else decay).append(p)
    return decay, no_decay


def param_groups(params, *, no_decay_norm_and_bias: bool = True) -> list[dict]:
    """Normalize ``params`` to a list of group dicts.

    ``params``: an ``nn.Module``, an iterable of tensors, or an iterable of group dicts whose
    ``"params"`` is a module or tensors. A module (top-level or a group's) is split into a decay
    and a zero-decay group when ``no_decay_norm_and_bias``; the other keys of a group (its own
    ``lr``, ``weight_decay``...) are kept. Empty groups are dropped.
    """
    if isinstance(params, nn.Module):
        items = [{"params": params}]
    else:
        items = list(params)
        if items and not isinstance(items[0], dict):
            items = [{"params": items}]
    groups = []
    for group in items:
        ps, rest = group["params"], {k: v for k, v in group.items() if k != "params"}
        if isinstance(ps, nn.Module):
            if no_decay_norm_and_bias:
                decay, no_decay = split_decay(ps)
                groups += [{"params": decay, **rest}, {"params": no_decay, **rest, "weight_decay": 0.0}]
                continue
            ps = [p for p in ps.parameters() if p.requires_grad]
        groups.append({"params": [ps] if isinstance(ps, torch.Tensor) else list(ps), **rest})
    return [g for g in groups if g["params"]]


def build_optimizer(params, *, name: str = "adamw", lr: float, weight_decay: float = 0.05, momentum: float = 0.9,
                    nesterov: bool = True, no_decay_norm_and_bias: bool = True) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, Nesterov when ``momentum > 0``) over :func:`param_groups` of ``params``.

    ``lr`` and ``weight_decay`` are defaults; a group's own ``"lr"``/``"weight_decay"`` wins.
    """
    groups = param_groups(params, no_decay_norm_and_bias=no_decay_norm_and_bias)
    if not groups:
        raise ValueError("no trainable parameters to optimize")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               nesterov=bool(nesterov and momentum > 0))
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def warmup_factor(step: int, *, warmup_steps: int) -> float:
    """``(step + 1) / warmup_steps`` during warm-up (the first step runs at ``1/warmup_steps``), then 1."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def cosine_factor(step: int, *, total_steps: int, min_ratio: float = 0.0) -> float:
    """Cosine from 1 at step 0 to ``min_ratio`` at ``total_steps`` (and after)."""
    progress = min(1.0, step / max(1, total_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_restarts_factor(step: int, *, period: int, mult: int = 1, min_ratio: float = 0.0) -> float:
    """SGDR: cosine cycles restarting at 1; the first lasts ``period`` steps, each next ``mult`` times longer."""
    period, t = max(1, int(period)), int(step)
    if mult == 1:
        t %= period
    else:
        while t >= period:
            t -= period
            period *= int(mult)
    return cosine_factor(t, total_steps=period, min_ratio=min_ratio)


def step_decay_factor(step: int, *, steps_per_epoch: int, step_epochs: int, gamma: float = 0.1) -> float:
    """``gamma ** (epoch // step_epochs)`` with ``epoch = step // steps_per_epoch``."""
    return gamma ** ((step // max(1, steps_per_epoch)) // max(1, step_epochs))


class Schedule:
    """Learning-rate schedule driven by ``step_batch()`` (after each optimizer step) and
    ``step_epoch(metric)`` (once per epoch). Build it with :func:`build_schedule`.

    ``factor(t)`` is the multiplier of each group's initial lr ``t`` steps after the warm-up
    (run by a ``LambdaLR``); ``plateau``, when given, holds ``ReduceLROnPlateau`` options plus
    ``min_lr_ratio``, and that scheduler owns the lrs once the warm-up is over.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, name: str, factor, warmup_steps: int,
                 plateau: dict | None = None):
        self.optimizer, self.name, self.warmup_steps = optimizer, name, int(warmup_steps)
        self.steps = self.epochs = 0
        self._factor = factor
        # LambdaLR records each group's initial_lr and sets lr = initial_lr * factor(0) now
        self.lambda_lr = LambdaLR(optimizer, self._lambda)
        self.plateau = None
        if plateau is not None:  # min_lr per group keeps the differential ratios at the floor too
            plateau = dict(plateau)
            ratio = plateau.pop("min_lr_ratio", 0.0)
            min_lr = [g["initial_lr"] * ratio for g in optimizer.param_groups]
            self.plateau = ReduceLROnPlateau(optimizer, mode="max", min_lr=min_lr, **plateau)

    def _lambda(self, step: int) -> float:
        return warmup_factor(step, warmup_steps=self.warmup_steps) * self._factor(max(0, step - self.warmup_steps))

    @property
    def lr(self) -> float:
        """Current learning rate of parameter group 0."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def lrs(self) -> list[float]:
        """Current learning rate of every parameter group."""
        return [g["lr"] for g in self.optimizer.param_groups]

    @property
    def in_warmup(self) -> bool:
        return self.steps < self.warmup_steps

    def step_batch(self) -> None:
        """Advance one optimizer step. Plateau: only the warm-up is per step; it then owns the lrs."""
        if self.plateau is None or self.steps < self.warmup_steps:
            self.lambda_lr.step()
        self.steps += 1

    def step_epoch(self, metric: float | None = None) -> None:
        """End of an epoch. ``plateau`` needs ``metric`` (higher is better) and ignores warm-up epochs."""
        self.epochs += 1
        if self.plateau is None:
            return
        if metric is None:
            raise ValueError("the plateau schedule needs the epoch's validation metric")
        if not self.in_warmup:
            self.plateau.step(float(metric))

    def state_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "epochs": self.epochs, "lrs": self.lrs,
                "lambda_lr": {k: v for k, v in self.lambda_lr.state_dict().items() if k != "lr_lambdas"},
                "plateau": None if self.plateau is None else self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters, the schedulers and the optimizer's current lrs (independent of whether
        the optimizer's own state was loaded before or after)."""
        if state["name"] != self.name:
            raise ValueError(f"state is of a {state['name']!r} schedule, this one is {self.name!r}")
        if len(state["lrs"]) != len(self.optimizer.param_groups):
            raise ValueError("state has a different number of parameter groups")
        self.steps, self.epochs = int(state["steps"]), int(state["epochs"])
        self.lambda_lr.load_state_dict({**state["lambda_lr"], "lr_lambdas": [None] * len(self.lambda_lr.lr_lambdas)})
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        for group, lr in zip(self.optimizer.param_groups, state["lrs"]):
            group["lr"] = lr

    def scale_lr(self, factor: float) -> None:
        """Scale every group's peak, current and minimum lr (``--resume`` with a new ``--lr``)."""
        self.lambda_lr.base_lrs = [b * factor for b in self.lambda_lr.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            group["initial_lr"] *= factor
        if self.plateau is not None:
            self.plateau.min_lrs = [m * factor for m in self.plateau.min_lrs]


def build_schedule(optimizer: torch.optim.Optimizer, *, name: str = "cosine", epochs: int, steps_per_epoch: int,
                   warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0, restart_epochs: int = 10,
                   restart_mult: int = 1, plateau_patience: int = 2, plateau_factor: float = 0.1,
                   step_epochs: int = 30, step_gamma: float = 0.1) -> Schedule:
    """A :class:`Schedule` (see the module docstring). Warm-up is ``round(warmup_epochs * steps_per_epoch)``
    steps; the cosine spans the remaining ``epochs * steps_per_epoch - warmup`` steps."""
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError("epochs and steps_per_epoch must be >= 1")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup = max(0, round(warmup_epochs * steps_per_epoch))
    plateau = None
    if name == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup)
        factor = lambda s: cosine_factor(s, total_steps=total, min_ratio=min_lr_ratio)  # noqa: E731
    elif name == "cosine_restarts":
        if restart_epochs <= 0 or restart_mult < 1 or int(restart_mult) != restart_mult:
            raise ValueError("restart_epochs must be > 0 and restart_mult an integer >= 1")
        period = max(1, round(restart_epochs * steps_per_epoch))
        factor = lambda s: cosine_restarts_factor(s, period=period, mult=int(restart_mult),  # noqa: E731
                                                  min_ratio=min_lr_ratio)
    elif name == "step":
        factor = lambda s: step_decay_factor(s + warmup, steps_per_epoch=steps_per_epoch,  # noqa: E731
                                             step_epochs=step_epochs, gamma=step_gamma)
    elif name in ("constant", "plateau"):
        factor = lambda s: 1.0  # noqa: E731
        if name == "plateau":
            plateau = {"patience": plateau_patience, "factor": plateau_factor, "min_lr_ratio": min_lr_ratio}
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    return Schedule(optimizer, name=name, factor=factor, warmup_steps=warmup, plateau=plateau)


class EarlyStopping:
    """Stop when the metric has not improved by more than ``min_delta`` for ``patience`` epochs in a
    row (``patience=0``: at the first epoch without improvement).

    ``mode="max"`` for accuracy, ``"min"`` for a loss. NaN never counts as an improvement.
    """

    def __init__(self, *, patience: int = 5, min_delta: float = 0.0, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if patience < 0 or min_delta < 0:
            raise ValueError("patience and min_delta must be >= 0")
        self.patience, self.min_delta, self.mode = int(patience), float(min_delta), mode
        self.best: float | None = None
        self.bad_epochs = 0
        self.stopped = False

    def improved(self, metric: float) -> bool:
        """Whether ``metric`` beats the best so far by more than ``min_delta``."""
        if math.isnan(metric):
            return False
        if self.best is None:
            return True
        return metric > self.best + self.min_delta if self.mode == "max" else metric < self.best - self.min_delta

    def step(self, metric: float) -> bool:
        """Record an epoch's metric; return True when training should stop."""
        metric = float(metric)
        if self.improved(metric):
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs > 0 and self.bad_epochs >= self.patience
        return self.stopped

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs, self.stopped = state["best"], int(state["bad_epochs"]), bool(state["stopped"])
