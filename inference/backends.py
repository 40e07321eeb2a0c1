"""Runtimes for the exported uint8-input graphs: ``backend(images_uint8) -> output(s)``.

Single-output graphs give a float32 tensor (logits, or probabilities for in-graph TTA); the in-graph
top-k graph gives ``(values, indices)``. Shared by the handler and by export's verification.

Each runtime is one class in :data:`RUNTIMES`, which says what it is to the rest of the project: its ``name``
(export's manifest), the graph file ``extensions`` it opens, the ``options`` of :func:`load_backend` it takes
beyond device and threads, whether its thread count is ``threads_fixed`` when it is created (the handler
rebuilds it when the worker's share of the cores changes), the Python ``packages`` an archive needs for it
(``requirements.txt``), and the ``companions``: files beside the graph's that belong to it. Another runtime
is one more class there.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from .signal_stack import openvino_core

log = logging.getLogger(__name__)

GRAPH_OUTPUTS = ("logits", "probabilities", "topk")  # probabilities: in-graph TTA; topk: (values, indices)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")         # what a graph's weights and math are
OPENVINO_PRECISIONS = ("auto", "f32", "bf16")         # OpenVINO's inference precision hint; auto: bf16 if the CPU has it


def _single(outputs: list[torch.Tensor]):
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


class TorchScriptBackend:
    name = "torchscript"
    extensions = (".pt", ".ts", ".torchscript")
    options = ()
    threads_fixed = False  # torch's intra-op threads, set by the worker: nothing to rebuild
    packages = ()          # torch is TorchServe's own
    companions = ()

    def __init__(self, path: str, *, device: torch.device = torch.device("cpu"), threads: int = 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(path, map_location=device).eval()
        self.device = device
        self.providers = [str(device)]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor):
        out = self.module(images.to(self.device, non_blocking=True))
        return tuple(out) if isinstance(out, (tuple, list)) else out


def _tensorrt_usable(available: list[str]) -> bool:
    """ONNX Runtime lists the TensorRT EP whenever it was built with it; it only works with libnvinfer."""
    if "TensorrtExecutionProvider" not in available:
        return False
    import ctypes
    try:
        ctypes.CDLL("libnvinfer.so.10")
        return True
    except OSError:
        return False


class OnnxRuntimeBackend:
    name = "onnxruntime"
    extensions = (".onnx",)
    options = ()
    threads_fixed = True
    packages = ("onnxruntime",)
    companions = ()

    def __init__(self, path: str, *, device: torch.device = torch.device("cpu"), threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in available:
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the pip-installed nvidia-* packages (torch's)
                ort.preload_dlls()
            gpu = {"device_id": device.index or 0}
            providers = ([("TensorrtExecutionProvider", gpu)] if _tensorrt_usable(available) else []) + \
                [("CUDAExecutionProvider", gpu)] + providers
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()
        # where its inputs and outputs live: the GPU only where a GPU provider runs it (the CPU onnxruntime
        # package, which archives pin, runs on the CPU on a GPU host too)
        self.device = device if self.providers[0] != "CPUExecutionProvider" else torch.device("cpu")
        log.info("ONNX Runtime providers for %s: %s", os.path.basename(path), self.providers)

    def __call__(self, images: torch.Tensor):
        outputs = self.session.run(None, {self.input_name: images.cpu().contiguous().numpy()})
        return _single([torch.from_numpy(o).to(self.device) for o in outputs])


class OpenVINOBackend:
    """OpenVINO on the CPU. ``precision``: ``f32`` or ``bf16`` (the inference precision hint).

    ``pinning`` is OpenVINO's ``ENABLE_CPU_PINNING``, off by default: OpenVINO pins each process's
    inference threads to the first cores of its affinity mask, so W TorchServe workers of T threads
    all land on the same T cores (Intel's KB 000058227; on the 2-vCPU AMX Xeon two 1-thread ResNet-50
    INT8 processes ran 26 img/s each pinned, as if on one core, against 44-91 unpinned). Turn it on
    only where one process owns its cores (one worker, or workers given disjoint core sets)."""
    name = "openvino"
    extensions = (".xml",)
    options = ("precision", "pinning")
    threads_fixed = True
    packages = ("openvino",)
    companions = (".bin",)  # the IR's weights

    def __init__(self, path: str, *, device: torch.device = torch.device("cpu"), threads: int = 0,
                 precision: str = "f32", hint: str = "LATENCY", pinning: bool = False):
        core = openvino_core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise RuntimeError("this CPU has no bf16 support (OpenVINO lists no BF16 capability)")
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "ENABLE_CPU_PINNING": pinning}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.device = torch.device("cpu")
        self.providers = [f"CPU {precision}" + (" pinned" if pinning else "")]

    def __call__(self, images: torch.Tensor):
        results = self.request.infer({0: images.cpu().contiguous().numpy()})
        return _single([torch.from_numpy(results[out].copy()) for out in self.compiled.outputs])


def openvino_precision(wanted: str = "auto") -> str:
    """OpenVINO inference precision: ``auto`` is bf16 where the CPU has it (AVX-512-bf16/AMX), else f32."""
    if wanted != "auto":
        return wanted
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "f32"
    return "bf16" if "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


def chunked(forward, images: torch.Tensor, *, step: int):
    """``forward`` over ``images`` in chunks of at most ``step``, the outputs concatenated (a tuple output, such
    as a top-k graph's ``(values, indices)``, output by output)."""
    if len(images) <= step:
        return forward(images)
    parts = [forward(images[i:i + step]) for i in range(0, len(images), step)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0])))
    return torch.cat(parts)


RUNTIMES: dict[str, type] = {cls.name: cls for cls in (TorchScriptBackend, OnnxRuntimeBackend, OpenVINOBackend)}


def runtime_for(path: str) -> type:
    """The runtime class of :data:`RUNTIMES` that opens ``path``, by its extension."""
    ext = os.path.splitext(path)[1].lower()
    for cls in RUNTIMES.values():
        if ext in cls.extensions:
            return cls
    known = ", ".join(f"{'/'.join(cls.extensions)} ({cls.name})" for cls in RUNTIMES.values())
    raise ValueError(f"no backend for {path!r}: expected {known}")


def load_backend(path: str, *, device: torch.device = torch.device("cpu"), threads: int = 0, **options):
    """The runtime picked from the file's extension (:func:`runtime_for`), with the ``options`` it takes
    (OpenVINO's ``precision`` and ``pinning``); options another runtime takes are ignored, unknown ones refused."""
    unknown = set(options) - {o for cls in RUNTIMES.values() for o in cls.options}
    if unknown:
        raise TypeError(f"load_backend() got unknown options {sorted(unknown)}")
    cls = runtime_for(path)
    return cls(path, device=device, threads=threads, **{k: v for k, v in options.items() if k in cls.options})
