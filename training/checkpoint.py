"""The checkpoint: the contract between training and export.

A plain dict of primitives and tensors, so it loads with ``torch.load(weights_only=True)``:
architecture name and keyword arguments, class names in index order, input/resize size, mean/std,
the weights and training metrics.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from inference.atomic import replacing

from .models import build_model
from .run_folder import SET_ASIDE

FORMAT_VERSION = 1


@dataclass
class ModelSpec:
    arch: str
    class_names: list[str]
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_kwargs: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build(self) -> nn.Module:
        return build_model(self.arch, num_classes=self.num_classes, **self.model_kwargs)


def save_checkpoint(path: str | os.PathLike, spec: ModelSpec, model: nn.Module, *,
                    metrics: dict | None = None, extra: dict | None = None) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"format_version": FORMAT_VERSION, **asdict(spec), "mean": list(spec.mean), "std": list(spec.std),
            "state_dict": state, "metrics": dict(metrics or {}), **(extra or {})}
    write_atomically(path, ckpt)


def write_atomically(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is always either the previous file or the new one
    (through :func:`inference.atomic.replacing`: a fsynced temporary in the same folder, then a rename)."""
    with replacing(path) as f:
        torch.save(obj, f)


def read_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint") -> dict:
    """The dict saved in ``path`` by :func:`save_checkpoint`; ``FileNotFoundError`` when there is no such file
    and ``ValueError`` naming ``what`` for any other file (a TorchScript archive, an ONNX graph, a YAML file:
    ``torch.load`` raises anything from ``RuntimeError`` to ``UnpicklingError``). Never unpickles arbitrary
    objects (``weights_only=True``)."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        aside = os.path.join(folder, SET_ASIDE, os.path.basename(path))
        hint = (f" (a `train --force` into {folder} was killed before its first checkpoint: the run it replaced is "
                f"in {os.path.dirname(aside)}/, and the next `train` into {folder} puts it back)"
                if os.path.isfile(aside) else "")
        raise FileNotFoundError((f"checkpoint not found: {path}" if what == "checkpoint" else
                                 f"{what} {path}: checkpoint not found") + hint)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} is not a checkpoint written by `python -m training train` "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what} {path} is not a checkpoint written by `python -m training train` (it holds a "
                         f"{type(ckpt).__name__})")
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelSpec, dict, dict]:
    """Return ``(spec, state_dict, checkpoint)``. Never unpickles arbitrary objects."""
    ckpt = read_checkpoint(path)
    missing = [k for k in ("arch", "class_names", "input_size", "mean", "std", "state_dict") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this project (missing {', '.join(missing)})")
    spec = ModelSpec(arch=ckpt["arch"], class_names=list(ckpt["class_names"]), input_size=int(ckpt["input_size"]),
                     resize_size=int(ckpt.get("resize_size") or ckpt["input_size"]),
                     mean=tuple(float(v) for v in ckpt["mean"]), std=tuple(float(v) for v in ckpt["std"]),
                     model_kwargs=dict(ckpt.get("model_kwargs") or {}))
    return spec, ckpt["state_dict"], ckpt


def restore_model(spec: ModelSpec, state_dict: dict, *, source: str | os.PathLike) -> nn.Module:
    """``spec``'s model with ``state_dict``'s weights, in eval mode; weights that do not fit the architecture
    (another version of the code, other model kwargs) are a ``ValueError`` naming ``source``."""
    model = spec.build()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # weights of another shape than the architecture the checkpoint names
        raise ValueError(f"{source}: its weights do not fit its architecture {spec.arch!r} "
                         f"({' '.join(str(e).split())[:200]})") from None
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[ModelSpec, nn.Module]:
    """Rebuild the trained model in eval mode."""
    spec, state_dict, _ = load_checkpoint(path)
    return spec, restore_model(spec, state_dict, source=path)
