"""The graph variants and their writers.

Every variant takes the input ``images`` (uint8, ``N x 3 x S x S``, dynamic batch) and normalizes
inside the graph. ``VARIANTS`` says what each one is for; the writers here (``export_torchscript``,
``export_onnx``, ``onnx_to_fp16``, ``onnx_to_int8``, ``onnx_to_openvino``) write one file (or the
``.xml``/``.bin`` pair for OpenVINO), and ``export.exporter.Exporter.write`` picks them per variant.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from inference.backends import RUNTIMES

ONNX_OPSET = 17
INPUT_NAME = "images"


@dataclass(frozen=True)
class Variant:
    name: str
    filename: str
    runtime: str          # a runtime of inference.backends.RUNTIMES: torchscript | onnxruntime | openvino
    precision: str        # fp32 | fp16 | bf16 | int8
    output: str           # logits | probabilities (in-graph TTA) | topk (in-graph top-k)
    purpose: str
    source: str | None = None  # the variant whose graph this one is converted from (None: traced from the model)

    def describe(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("torchscript", "model.pt", "torchscript", "fp32", "logits",
            "traced + frozen; CPU or GPU with torch only; the reference serving graph"),
    Variant("torchscript-bf16", "model_bf16.pt", "torchscript", "bf16", "logits",
            "GPU (Ampere+) or CPUs with AVX-512-bf16/AMX: half the memory traffic"),
    Variant("torchscript-fp16", "model_fp16.pt", "torchscript", "fp16", "logits",
            "GPU throughput (tensor cores); slow on most CPUs"),
    Variant("onnx", "model.onnx", "onnxruntime", "fp32", "logits",
            "portable: ONNX Runtime (CPU/CUDA/TensorRT EPs), Triton, OpenVINO; ~2x torch eager on CPU"),
    Variant("onnx-fp16", "model_fp16.onnx", "onnxruntime", "fp16", "logits",
            "GPU with the CUDA/TensorRT EP: fp16 weights and math, uint8 in / fp32 out", source="onnx"),
    Variant("onnx-int8", "model_int8.onnx", "onnxruntime", "int8", "logits",
            "CPU throughput where OpenVINO is not available: static QDQ INT8, calibrated", source="onnx"),
    Variant("onnx-tta", "model_tta.onnx", "onnxruntime", "fp32", "probabilities",
            "TTA inside the graph (flip or five-crop + flip): portable to any runtime, no handler code"),
    Variant("onnx-topk", "model_topk.onnx", "onnxruntime", "fp32", "topk",
            "outputs (probabilities[k], indices[k]): clients of the bare ONNX model need no post-processing"),
    Variant("openvino", "model_ov.xml", "openvino", "fp32", "logits",
            "Intel/AMD CPUs: OpenVINO IR; runs bf16 with the bf16 hint on CPUs that have it", source="onnx"),
    Variant("openvino-int8", "model_ov_int8.xml", "openvino", "int8", "logits",
            "fastest on CPU: NNCF post-training INT8 calibrated on training images", source="onnx"),
]}


def fp32_counterpart(variant: Variant) -> Variant:
    """The fp32 variant of the same runtime and output: what a reduced-precision graph's speed is compared with."""
    return next(v for v in VARIANTS.values()
                if (v.runtime, v.output, v.precision) == (variant.runtime, variant.output, "fp32"))


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if names == ["all"]:
        return list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(VARIANTS)} or all")
    return names


def export_torchscript(module: nn.Module, example: torch.Tensor, path: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        torch.jit.save(torch.jit.freeze(traced), path)  # the freezer folds BatchNorm into convolutions


def export_onnx(module: nn.Module, example: torch.Tensor, path: str, *, output_names: list[str],
                opset: int = ONNX_OPSET) -> None:
    """ONNX with a dynamic batch axis; checked with ``onnx.checker`` (full) and shape inference."""

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but dependable
        torch.onnx.export(module.eval(), (example,), path, input_names=[INPUT_NAME], output_names=output_names,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}},
                          opset_version=opset, dynamo=False)
    check_onnx(path)


def check_onnx(path: str) -> None:
    import onnx

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(onnx.shape_inference.infer_shapes(model), path)


def onnx_to_fp16(src: str, dst: str) -> None:
    """fp16 weights and math; uint8 input and fp32 output kept (``keep_io_types``)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, dst)
    check_onnx(dst)


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader protocol over uint8 batches."""

    def __init__(self, images: torch.Tensor, batch: int = 16):
        self.batches = iter([{INPUT_NAME: images[i:i + batch].numpy()} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def onnx_to_int8(src: str, dst: str, calibration: torch.Tensor, *, exclude: list[str] | None = None) -> None:
    """Static INT8 (QDQ, per-channel weights, MinMax calibration) with ONNX Runtime's quantizer; the nodes
    named in ``exclude`` stay fp32 (:mod:`export.int8` passes the layers its accuracy control kept)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst + ".prep.onnx"
    try:
        quant_pre_process(src, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, dst, _CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude or []))
    finally:
        for p in (prepared, prepared + ".data"):
            if os.path.exists(p):
                os.remove(p)


def onnx_to_openvino(src: str, dst_xml: str, *, calibration: torch.Tensor | None = None,
                     ignored: list[str] = (), patterns: list[str] = ()) -> None:
    """OpenVINO IR (fp32 weights) from the ONNX graph; plain NNCF INT8 when ``calibration`` is given (speed-only
    exports of random-weight models: trained models get :func:`export.int8.openvino_int8`), with the layers
    named in ``ignored`` or matched by ``patterns`` (the attention gates) left in fp32."""
    import openvino as ov

    model = ov.convert_model(src)
    if calibration is not None:
        import nncf

        from inference.signal_stack import keep_signal_stack

        batches = [calibration[i:i + 1].numpy() for i in range(len(calibration))]
        with keep_signal_stack():  # NNCF's engines make Core objects of their own (see inference.signal_stack)
            model = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                                  preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False,
                                  ignored_scope=nncf.IgnoredScope(names=list(ignored), patterns=list(patterns),
                                                                  validate=False))
    ov.save_model(model, dst_xml, compress_to_fp16=False)


def files_of(variant: Variant, out_dir: str) -> list[str]:
    """Every file a variant consists of (OpenVINO IR: .xml and .bin)."""
    path = os.path.join(out_dir, variant.filename)
    return [path] + [os.path.splitext(path)[0] + suffix for suffix in RUNTIMES[variant.runtime].companions]
