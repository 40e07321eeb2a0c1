"""The in-process limit: what the served backend does without HTTP or TorchServe, in this process.

``in_process_limit`` runs decode + preprocess + forward (+ TTA) + top-k at the served batch size
through the same exported graph and backend settings as the handler, timed by ``tools.timing``
(median over blocks of ``torch.utils.benchmark.Timer``, at torch's current thread count).
``adaptive_threshold`` picks the confidence threshold the adaptive-TTA configuration is served with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.configs import Config
from tools.models import ExportedModel
from tools.timing import rate


def adaptive_threshold(export_dir: Path, spec, payload_dir: Path, quantile: float = 0.25) -> float:
    """Random weights have no meaningful confidence: pick the threshold that sends about a quarter of
    these payloads to TTA, so the cost of adaptive TTA at that trigger rate is what gets measured."""
    from inference.backends import load_backend
    from inference.images import read_image_file
    from inference.transforms import EvalPreset
    paths = sorted(p for p in payload_dir.rglob("*.jpg"))
    batch = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size).batch([read_image_file(str(p)) for p in paths])
    conf = load_backend(str(export_dir / "model.onnx"))(batch).softmax(-1).max(1).values
    return float(conf.quantile(quantile))


def in_process_limit(c: Config, prep: ExportedModel, payload_dir: Path, seconds: float = 8.0, batch: int = 8) -> float:
    """Images per second: decode + preprocess + forward (+ TTA) at the served batch size, no HTTP."""
    from inference.backends import load_backend, openvino_precision
    from inference.images import decode_many
    from inference.tta import canvas_preset, predict_proba
    spec = prep.spec
    info = json.loads((prep.export_dir / "export.json").read_text())["variants"][c.variant]
    precision = openvino_precision(c.handler.get("openvino_precision", "auto"))  # as the served handler does
    backend = load_backend(str(prep.export_dir / info["files"][0]), threads=torch.get_num_threads(),
                           precision=precision)
    datas = [p.read_bytes() for p in sorted(payload_dir.rglob("*.jpg"))]
    preset = canvas_preset(c.tta, crop_size=spec.input_size, resize_size=spec.resize_size)
    at = [0]

    def one_batch():
        chunk = [datas[(at[0] + k) % len(datas)] for k in range(batch)]
        at[0] += batch
        canvas = torch.stack(decode_many(chunk, transform=preset, min_side=preset.min_decode_side))  # as the handler
        predict_proba(backend, canvas, c.tta, crop_size=spec.input_size).topk(5, dim=1)
    return rate(one_batch, batch, min_run_time=seconds)
