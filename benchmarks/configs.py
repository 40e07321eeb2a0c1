"""The configurations ``make bench`` compares: which handler, graph variant, TTA, workers and threads.

``stock`` is TorchServe's built-in ``image_classifier`` in the best stock configuration measured on
this kind of machine (2 workers, OMP_NUM_THREADS=1); every ``ours_*`` is this project's handler with
one exported graph. All of them serve batch 8 with a 10 ms batch delay.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Config:
    name: str
    kind: str                        # stock | ours
    variant: str = "onnx"
    tta: str = "none"
    adaptive: bool = False
    workers: int = 1
    threads: int = 0
    env: dict = field(default_factory=dict)
    handler: dict = field(default_factory=dict)   # extra model-config.yaml handler settings


CONFIGS: dict[str, Config] = {c.name: c for c in [
    Config("stock", "stock", workers=2, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    # Best measured on this 2-core machine: ONNX Runtime with 2 workers x 1 thread (17.7 img/s vs 15.1
    # for 1 x 2 at 16 users), OpenVINO with 1 worker x 2 threads (28.4 vs 16.7 for 2 x 1).
    Config("ours_fp32", "ours", "onnx", workers=2, threads=1),
    Config("ours_fp32_flip", "ours", "onnx", tta="flip", workers=2, threads=1),
    Config("ours_fp32_adaptive", "ours", "onnx", tta="flip", adaptive=True, workers=2, threads=1),
    Config("ours_ov_f32", "ours", "openvino", handler={"openvino_precision": "f32"}),
    # bf16 where the CPU has it (AVX-512-bf16/AMX), else f32: OpenVINO's own default on such CPUs
    Config("ours_ov_bf16", "ours", "openvino", handler={"openvino_precision": "auto"}),
    Config("ours_ov_int8", "ours", "openvino-int8"),
    Config("ours_fp32_1w", "ours", "onnx"),
    Config("ours_ov_int8_2w", "ours", "openvino-int8", workers=2, threads=1),
]}
