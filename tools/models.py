"""Random-initialised models, checkpointed and exported, for runs that measure speed, not accuracy.

The weights are fixed by seed 0, so every run (the benchmark's configurations, the soak, the GPU
smoke check) serves the same model. ``MODELS`` names the ones used: ResNet-50 with 100 classes is the
stock TorchServe baseline's model; ``cbam_resnet`` (full width, 4.9 M parameters, 32 px) and
``se_resnext101_32x8d`` (224 px) are the project's; ``smoke`` is a tiny cbam_resnet for CI.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# model -> (input size, resize size, architecture kwargs, classes)
MODELS = {
    "resnet50": (224, 256, {}, 100),
    "cbam_resnet": (32, 32, {}, 10),
    "se_resnext101_32x8d": (224, 256, {}, 100),
    "smoke": (32, 36, {"widths": [8, 8, 16, 16], "head_width": 32}, 10),
}


@dataclass
class ExportedModel:
    spec: object            # training.checkpoint.ModelSpec
    ckpt: Path              # the project's checkpoint
    state_dict: Path        # the bare state dict (what TorchServe's eager mode loads)
    export_dir: Path        # the exported graphs and export.json


def arch_of(model: str) -> str:
    """The architecture (``export.json``'s ``arch``) of a model of :data:`MODELS`."""
    return "cbam_resnet" if model == "smoke" else model


def default_variants(model: str) -> list[str]:
    return ["onnx"] if model == "smoke" else ["onnx", "openvino", "openvino-int8"]


def export_random_model(model: str, work: Path, *, calib_data: Path | None = None,
                        variants: list[str] | None = None, keep_fp32: list[str] = ()) -> ExportedModel:
    """Checkpoint ``work/MODEL.pt`` (and ``work/MODEL_state.pth``) and its ``variants`` (default: ONNX and,
    except for ``smoke``, OpenVINO f32/INT8, calibrated on ``calib_data``, INT8 with the layers named in
    ``keep_fp32`` left in fp32) under ``work/export_MODEL``. Accuracy is not checked (``speed_only``): the
    weights are random."""
    from export.exporter import Exporter
    from training.checkpoint import ModelSpec, save_checkpoint
    from training.stats import IMAGENET_MEAN, IMAGENET_STD

    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(0)
    size, resize, kwargs, classes = MODELS[model]
    arch = arch_of(model)
    spec = ModelSpec(arch=arch, class_names=[f"class_{i:03d}" for i in range(classes)], input_size=size,
                     resize_size=resize, mean=IMAGENET_MEAN, std=IMAGENET_STD, model_kwargs=kwargs)
    net = spec.build().eval()
    ckpt = work / f"{model}.pt"
    save_checkpoint(ckpt, spec, net)
    state_dict = work / f"{model}_state.pth"
    torch.save(net.state_dict(), state_dict)
    export_dir = work / f"export_{model}"
    Exporter(str(ckpt), str(export_dir)).run(variants or default_variants(model), data=None,
                                             calib_data=None if calib_data is None else str(calib_data),
                                             eval_images=16, calib_images=64, speed_only=True,
                                             keep_fp32=keep_fp32, log=lambda *a: None)
    return ExportedModel(spec, ckpt, state_dict, export_dir)
