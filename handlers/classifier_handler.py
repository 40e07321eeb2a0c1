"""TorchServe handler for the exported uint8-input classifiers.

initialize -> preprocess (read, decode in a thread pool, eval resize/crop, batched) -> inference (all
TTA views of all requests in ONE forward) -> postprocess (top-k per request, JSON, per-request
status). A bad request gets its own 4xx and JSON error; the rest of its batch is answered normally.

TorchServe requires exactly one class in this module: helpers live in the other modules.
Inside a ``.mar`` the helper modules sit flat next to this file; inside the repository they live
in ``handlers/`` and ``training/``. The imports below work in both places.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from ts.torch_handler.base_handler import BaseHandler

try:  # inside the repository
    from handlers.backends import load_backend
    from handlers.pipeline import Batch, RequestError, error_body, parse_topk, read_body, topk_predictions
    from training.class_index import INDEX_FILE, read_index_to_name
    from training.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb
    from training.presets import EvalPreset
    from training.tta import TTA_MODES, num_views, predict_proba
except ImportError:  # inside a .mar: flat modules in the model directory
    from backends import load_backend
    from pipeline import Batch, RequestError, error_body, parse_topk, read_body, topk_predictions
    from class_index import INDEX_FILE, read_index_to_name
    from images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb
    from presets import EvalPreset
    from tta import TTA_MODES, num_views, predict_proba

log = logging.getLogger(__name__)


class ImageClassifierHandler(BaseHandler):
    def initialize(self, context):
        props = context.system_properties
        model_dir = props["model_dir"]
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        cfg = yaml_cfg.get("handler", {}) or {}
        gpu_id = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        workers = int(yaml_cfg.get("minWorkers", 1) or 1)
        self.threads = int(cfg.get("threads") or max(1, (os.cpu_count() or 1) // workers))
        torch.set_num_threads(self.threads)
        self.tta = str(cfg.get("tta", "none"))
        if self.tta not in TTA_MODES:
            raise ValueError(f"model-config.yaml handler.tta must be one of {TTA_MODES}, got {self.tta!r}")
        # What the graph returns: logits (TTA here), probabilities (TTA in the graph) or its own top-k.
        self.graph_output = str(cfg.get("graph_output", "logits"))
        if self.graph_output not in ("logits", "probabilities", "topk"):
            raise ValueError(f"model-config.yaml handler.graph_output {self.graph_output!r} is not "
                             "logits, probabilities or topk")
        if self.graph_output != "logits":
            self.tta = "none"
        self.tta_label = str(cfg.get("graph_tta", "none")) if self.graph_output == "probabilities" else self.tta
        self.class_names = read_index_to_name(os.path.join(model_dir, INDEX_FILE))
        self.max_topk = int(cfg.get("graph_topk") or len(self.class_names))
        self.default_topk = min(int(cfg.get("topk", 5)), self.max_topk)
        self.max_pixels = int(cfg.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.preset = EvalPreset(crop_size=int(cfg["input_size"]), resize_size=int(cfg.get("resize_size") or 0) or None)
        serialized = context.manifest["model"]["serializedFile"]
        self.backend = load_backend(os.path.join(model_dir, serialized), device=self.device, threads=self.threads,
                                    precision=self._openvino_precision(cfg))
        self.decode_pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")
        self.model_name = context.manifest["model"].get("modelName", "")
        self.model_version = context.manifest["model"].get("modelVersion", "")
        batch = int(yaml_cfg.get("batchSize", 1) or 1)
        warm = torch.zeros((batch * num_views(self.tta), 3, self.preset.crop_size, self.preset.crop_size),
                           dtype=torch.uint8, device=self.device)
        start = time.perf_counter()
        self.backend(warm)
        log.info("%s: %s on %s, %d threads, tta=%s, topk=%d, warm-up %.0f ms", self.model_name, self.backend.name,
                 self.device, self.threads, self.tta, self.default_topk, (time.perf_counter() - start) * 1000)
        self.initialized = True

    @staticmethod
    def _openvino_precision(cfg: dict) -> str:
        """OpenVINO inference precision: bf16 where the CPU has it (``auto``), else f32."""
        wanted = str(cfg.get("openvino_precision", "auto"))
        if wanted != "auto":
            return wanted
        try:
            import openvino as ov
            return "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
        except ImportError:
            return "f32"

    def _read_one(self, row: dict, headers: dict) -> tuple[torch.Tensor, int]:
        topk = parse_topk(headers, default=self.default_topk, num_classes=self.max_topk)
        return decode_rgb(read_body(row), max_pixels=self.max_pixels), topk

    def preprocess(self, data: list[dict]) -> Batch:
        batch = Batch(size=len(data))
        headers = [self.context.get_all_request_header(i) if self.context else {} for i in range(len(data))]
        futures = [self.decode_pool.submit(self._read_one, row, h) for row, h in zip(data, headers)]
        images = []
        for i, fut in enumerate(futures):
            try:
                image, batch.topk[i] = fut.result()
            except (RequestError, ImageError) as e:
                batch.errors[i] = e
                continue
            batch.valid.append(i)
            images.append(image.to(self.device, non_blocking=True))
        if images:
            batch.images = self.preset.batch(images)
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        if batch.images is None:
            return batch
        k = max(batch.topk[i] for i in batch.valid)
        if self.graph_output == "topk":
            values, indices = self.backend(batch.images)
        else:
            probs = predict_proba(self.backend, batch.images, self.tta) if self.graph_output == "logits" \
                else self.backend(batch.images)
            values, indices = probs.topk(k, dim=1)
        batch.values, batch.indices = values.cpu(), indices.cpu()
        return batch

    def postprocess(self, batch: Batch) -> list[str]:
        out: list[str] = [""] * batch.size
        if batch.values is not None:
            preds = topk_predictions(batch.values, batch.indices, [batch.topk[i] for i in batch.valid],
                                     self.class_names)
            for i, p in zip(batch.valid, preds):
                out[i] = json.dumps({"predictions": p, "model": self.model_name, "version": self.model_version,
                                     "tta": self.tta_label})
        for i, err in batch.errors.items():
            status, kind = getattr(err, "status", 400), getattr(err, "error", None)
            kind = kind or ("image too large" if status == 413 else "bad image")
            out[i] = error_body(kind, str(err))
            if self.context is not None:
                self.context.set_response_status(status, kind, idx=i)
        if self.context is not None:
            for i in range(batch.size):
                self.context.set_response_content_type(i, "application/json")
        return out
