"""Writers for each exported graph format. Each takes the uint8-input wrapper and an example batch."""
from __future__ import annotations

import warnings

import torch
from torch import nn

ONNX_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: str) -> None:
    """Trace, then freeze (constants inlined, BatchNorm folded into convolutions by the freezer)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        traced = torch.jit.trace(wrapper.eval(), example)
        frozen = torch.jit.freeze(traced)
        torch.jit.save(frozen, path)


def export_onnx(wrapper: nn.Module, example: torch.Tensor, path: str, *, opset: int = ONNX_OPSET) -> None:
    """ONNX with a dynamic batch axis; checked with ``onnx.checker`` and shape inference."""
    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but dependable
        torch.onnx.export(wrapper.eval(), (example,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(onnx.shape_inference.infer_shapes(model), path)


WRITERS = {"torchscript": (export_torchscript, "model.pt"), "onnx": (export_onnx, "model.onnx")}
