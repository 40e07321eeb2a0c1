"""Runtimes for the exported uint8-input graphs: ``backend(images_uint8) -> logits``.

Shared by the handler and by export's verification. Flat-importable (no relative imports): it
travels inside the ``.mar``.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

log = logging.getLogger(__name__)


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: str, *, device: torch.device = torch.device("cpu")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(path, map_location=device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.device, non_blocking=True)).float()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: str, *, device: torch.device = torch.device("cpu"), threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.device = device
        log.info("ONNX Runtime providers: %s", self.session.get_providers())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: images.cpu().contiguous().numpy()})
        return torch.from_numpy(logits).to(self.device)


def load_backend(path: str, *, device: torch.device = torch.device("cpu"), threads: int = 0):
    """Pick the runtime from the file: ``.onnx`` -> ONNX Runtime, ``.pt`` -> TorchScript."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        return OnnxRuntimeBackend(path, device=device, threads=threads)
    if ext in (".pt", ".ts", ".torchscript"):
        return TorchScriptBackend(path, device=device)
    raise ValueError(f"no backend for {path!r}: expected a .pt (TorchScript) or .onnx file")
