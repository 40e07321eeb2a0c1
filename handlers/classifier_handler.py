"""TorchServe handler for the exported uint8-input classifiers.

initialize -> preprocess (read; header checks and pixel budgets; decode + eval resize/crop image by image in a
thread pool, JPEGs reduced in the DCT domain to what the resize needs, or all JPEGs in one nvjpeg call on a GPU) -> inference (all TTA views of all images in ONE forward, or
adaptive: TTA only for the uncertain ones) -> postprocess (top-k per request, JSON, per-request
status). Each request of a batch may speak its own protocol (TorchServe's, KServe v1 or the Open Inference
Protocol v2: ``inference.protocols``) and is answered in it. A bad request gets its own 4xx and JSON
error; the rest of its batch is answered normally.
A failure of the model is retried request by request (``inference.batch.predict_per_request``): the
requests that fail alone get 500 and a log line, the others their answers; never a hung request.

Settings come from the archive's ``model-config.yaml`` (``handler:`` section), read and validated by
:class:`inference.settings.HandlerSettings`: an unknown key or a bad value stops the worker at
start-up with a message naming the key. Threads follow the model's live workers (``inference.threads``);
metrics: ``inference.metrics``; ``describe_handle`` answers the archive's model card.

TorchServe requires exactly one class in this module. Everything else is the inference core,
``inference/``, which the archive carries as a package directory, so the imports below are the same
in the repository and inside a ``.mar``.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from inference import protocols
from inference.admission import admit, batch_pixel_budget, probe_requests
from inference.backends import chunked, load_backend, openvino_precision
from inference.batch import Batch, predict_per_request, stack_images
from inference.class_index import INDEX_FILE, MODEL_CARD_FILE, check_graph_width, read_index_to_name
from inference.decode_memory import DecodeMemory
from inference.explain_requests import explain_request
from inference.image_errors import ImageError, in_request
from inference.images import batch_jpeg_decoder, decode_many
from inference.metrics import METRICS, batch_metrics, dimensions
from inference.requests import RequestError
from inference.responses import failure_reason, top_classes, topk_predictions, unanswerable_rows
from inference.settings import HandlerSettings, WorkerSettings
from inference.threads import WorkerThreads
from inference.transforms import EvalPreset
from inference.tta import adaptive_predict_proba, canvas_preset, num_views, predict_proba

log = logging.getLogger(__name__)


class ImageClassifierHandler(BaseHandler):
    def initialize(self, context):
        props = context.system_properties
        model_dir = props["model_dir"]
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        self.settings = cfg = HandlerSettings.from_config(yaml_cfg.get("handler"))
        self.model_name, self.model_version = (context.manifest["model"].get(k, "") for k in ("modelName", "modelVersion"))
        self.model_name = getattr(context, "model_name", None) or self.model_name  # as registered (model_name=)
        gpu_id = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        # threads = cores // the model's live workers, re-sized as they change (inference.threads)
        workers = WorkerSettings.of_model_config(yaml_cfg).workers  # minWorkers: two is a message, not a traceback
        self.worker_threads = WorkerThreads(configured=cfg.threads, workers=workers,
                                            model_dir=model_dir, interval=cfg.threads_check_interval,
                                            name=self.model_name)
        self.decode_memory = DecodeMemory(cfg.max_decode_bytes)  # the decode pool's threads share it
        index_path = os.path.join(model_dir, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{INDEX_FILE} is missing from the archive of model {self.model_name}: rebuild "
                                    "it with `python -m export archive`")
        self.class_names = read_index_to_name(index_path)
        self.graph_output, self.tta = cfg.graph_output, cfg.handler_tta
        self.adaptive = cfg.adaptive_tta and self.tta != "none"
        self.views = num_views(self.tta, cfg.tta_scales)  # per image in the handler's forward; the graph's own:
        self.metric_views = num_views(cfg.graph_tta) if self.graph_output == "probabilities" else self.views
        self.tta_label = cfg.graph_tta if self.graph_output == "probabilities" else self.tta
        self.max_topk = cfg.graph_topk or len(self.class_names)
        self.default_topk = min(cfg.topk, self.max_topk)
        self.crop_size, resize_size = cfg.input_size, cfg.resize_size or cfg.input_size
        self.canvas = canvas_preset(self.tta, crop_size=self.crop_size, resize_size=resize_size) \
            if self.graph_output == "logits" else EvalPreset(crop_size=self.crop_size, resize_size=resize_size)
        serialized = context.manifest["model"]["serializedFile"]
        precision = openvino_precision(cfg.openvino_precision)
        load = lambda threads: load_backend(os.path.join(model_dir, serialized), device=self.device,  # noqa: E731
                                            threads=threads, precision=precision,
                                            pinning=cfg.openvino_cpu_pinning)
        self.backend = load(self.worker_threads.threads)
        self.device = self.backend.device  # a CPU runtime on a GPU host (OpenVINO, CPU onnxruntime): decode on the CPU
        if self.backend.threads_fixed and self.device.type == "cpu":
            self.worker_threads.rebuild = lambda threads: setattr(self, "backend", load(threads))
        self.jpeg_batch_decoder = None
        if self.device.type == "cuda":  # nvjpeg: every JPEG of a batch in one call, straight into GPU memory
            self.jpeg_batch_decoder = batch_jpeg_decoder(self.device)
        self.batch_size = batch = int(context.system_properties.get("batch_size") or yaml_cfg.get("batchSize") or 1)
        warm = torch.zeros((batch * self.views, 3, self.crop_size, self.crop_size), dtype=torch.uint8,
                           device=self.device)
        start = time.perf_counter()
        out = self.forward(warm)  # and its width against the names: a mismatch would fail every batch
        check_graph_width((out[0] if isinstance(out, tuple) else out).shape[-1], class_names=self.class_names,
                          graph_topk=cfg.graph_topk if self.graph_output == "topk" else None)
        log.info("%s %s: %s (%s) on %s, %d threads, tta=%s%s, topk=%d, batch budget %d px, decode memory %d MB, "
                 "warm-up %.0f ms",
                 self.model_name, self.model_version, self.backend.name, ", ".join(map(str, self.backend.providers)),
                 self.device, self.worker_threads.threads, self.tta, " (adaptive)" if self.adaptive else "",
                 self.default_topk, self.max_batch_pixels, cfg.max_decode_bytes >> 20, (time.perf_counter() - start) * 1000)
        self.initialized = True

    @property
    def max_batch_pixels(self) -> int:
        """Decoded pixels per batch: as configured, else the decoder's (``inference.admission.batch_pixel_budget``)."""
        return batch_pixel_budget(self.settings.max_batch_pixels, batch_size=self.batch_size,
                                  full_size=self.jpeg_batch_decoder is not None)

    def forward(self, images: torch.Tensor):
        """The backend over ``images``, chunked by ``max_forward_batch``."""
        return chunked(self.backend, images, step=self.settings.max_forward_batch)

    # -- the TorchServe contract ---------------------------------------------------------------------
    def preprocess(self, data: list[dict]) -> Batch:
        self.worker_threads.follow()  # the model's worker count changed: re-size the threads first
        start = time.perf_counter()
        batch = Batch(size=len(data))
        payloads, owners = [], []
        for i, row in enumerate(data):
            headers = self.context.get_all_request_header(i) if self.context else {}
            batch.protocols[i], req, topk = protocols.read_row(
                row, headers, max_images=self.settings.max_images_per_request, default_topk=self.default_topk,
                max_topk=self.max_topk, max_inflated=self.settings.max_inflated_bytes)
            if isinstance(req, RequestError):
                batch.errors[i] = req
            else:
                batch.requests[i], batch.topk[i] = req, topk
        # admission: every image's header first, then the request and batch budgets (no pixel decoded yet)
        cfg = self.settings
        limits = dict(max_pixels=cfg.max_pixels, max_aspect_ratio=cfg.max_aspect_ratio, max_frames=cfg.max_frames)
        infos, refused = probe_requests({i: r for i, r in batch.requests.items() if i not in batch.errors}, **limits)
        batch.errors.update(refused)
        # an image costs what it is decoded to: reduced JPEGs on the CPU, full size through nvjpeg on a GPU
        min_side = None if self.jpeg_batch_decoder is not None else self.canvas.min_decode_side
        batch.errors.update(admit(infos, max_request_pixels=cfg.max_request_pixels,
                                  max_batch_pixels=self.max_batch_pixels, min_side=min_side))
        headers_read = []
        for i, req in batch.requests.items():
            if i not in batch.errors:
                payloads += req.images
                owners += [i] * len(req.images)
                headers_read += infos[i]
        # decode -> canvas image by image per pool thread, JPEGs DCT-reduced (GPU: nvjpeg, then same-shape groups)
        decoded = decode_many(payloads, **limits, device=self.device, pool=self.worker_threads.pool,
                              jpeg_batch_decoder=self.jpeg_batch_decoder, infos=headers_read, transform=self.canvas,
                              min_side=self.canvas.min_decode_side, memory=self.decode_memory)
        position: dict[int, int] = {}
        for image, owner in zip(decoded, owners):
            k = position[owner] = position.get(owner, -1) + 1
            if isinstance(image, ImageError) and owner not in batch.errors:
                req = batch.requests[owner]
                batch.errors[owner] = in_request(image, k, len(req.images), multi=req.multi)
        batch.timings["decode"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        images = [(img, o) for img, o in zip(decoded, owners) if o not in batch.errors]
        if images:  # one stack; on a failure (out of memory, say) request by request: the others are answered
            batch.canvas, batch.owners = stack_images(images, batch.errors, name=self.model_name)
        batch.timings["preprocess"] = (time.perf_counter() - start) * 1000
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        if batch.canvas is None:
            return batch
        start = time.perf_counter()
        k = max(batch.topk[i] for i in set(batch.owners))
        # the model failed: request by request, so that only the requests that fail alone get their 500
        predict_per_request(lambda canvas: self.predict(canvas, k), batch, name=self.model_name)
        batch.timings["forward"] = (time.perf_counter() - start) * 1000
        return batch

    def predict(self, canvas: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, indices, tta applied)``: the top-``k`` classes of each image of ``canvas``."""
        cfg, applied = self.settings, torch.full((len(canvas),), self.tta != "none")
        if self.graph_output == "topk":
            return (*self.forward(canvas), applied)
        if self.graph_output == "probabilities":
            probs = self.forward(canvas)
        elif self.adaptive:
            probs, applied = adaptive_predict_proba(
                self.forward, canvas, self.tta, crop_size=self.crop_size, scales=cfg.tta_scales,
                how=cfg.tta_aggregate, metric=cfg.adaptive_metric, threshold=cfg.adaptive_threshold)
        else:
            probs = predict_proba(self.forward, canvas, self.tta, crop_size=self.crop_size, scales=cfg.tta_scales,
                                  how=cfg.tta_aggregate)
        return (*top_classes(probs, k), applied)

    def postprocess(self, batch: Batch) -> list[str]:
        out: list[str] = [""] * batch.size
        if batch.values is not None:
            for k, why in unanswerable_rows(batch.values, batch.indices, classes=len(self.class_names)).items():
                batch.errors.setdefault(batch.owners[k], RequestError(why, status=500, error="inference failed"))
            keep = [k for k, o in enumerate(batch.owners) if o not in batch.errors]  # that request's 500 alone
            preds = topk_predictions(batch.values[keep], batch.indices[keep], [batch.topk[batch.owners[k]] for k in keep],
                                     self.class_names)
            per_request: dict[int, list[dict]] = {}
            tta_applied = batch.tta_applied.tolist()
            for k, p in zip(keep, preds):
                owner, applied = batch.owners[k], tta_applied[k]
                body = {"predictions": p, "model": self.model_name, "version": self.model_version,
                        "tta": self.tta_label if applied or self.graph_output != "logits" else "none"}
                if self.adaptive:
                    body["tta_applied"] = bool(applied)
                per_request.setdefault(owner, []).append(body)
            for owner, results in per_request.items():  # a body that cannot be built is that request's 500
                body = protocols.answer(batch.requests[owner], results, model_name=self.model_name,
                                        model_version=self.model_version)
                if isinstance(body, RequestError):
                    batch.errors[owner] = body
                else:
                    out[owner] = body
        limit = self.settings.max_response_bytes  # longer: TorchServe would drop the worker (protocols.bounded)
        batch.errors.update({i: e for i, body in enumerate(out) if (e := protocols.bounded(body, limit=limit))})
        if batch.failure is not None:
            for owner in set(batch.owners):
                batch.errors[owner] = RequestError(f"the model failed on this batch: {failure_reason(batch.failure)}",
                                                   status=500, error="inference failed")
        statuses = []
        for i, err in batch.errors.items():
            status, kind = protocols.status_of(err)
            statuses.append(status)
            grpc = self.context is not None and protocols.is_grpc_call(self.context.get_all_request_header(i))
            out[i] = protocols.render_error(batch.protocols.get(i, protocols.TORCHSERVE), kind, str(err), status=status,
                                            model_name=self.model_name, model_version=self.model_version, grpc=grpc)
            if self.context is not None:
                self.context.set_response_status(status, kind, idx=i)
        if self.context is not None:
            for i in range(batch.size):
                grpc = protocols.is_grpc_call(self.context.get_all_request_header(i))
                for key, value in protocols.answer_headers(out[i], grpc=grpc).items():
                    self.context.set_response_header(i, key, value)
        self._record_metrics(batch, statuses)
        return out

    # -- POST /explanations/NAME and /v1/models/NAME:explain: occlusion maps (inference.explain) ------------
    def _is_describe(self):  # BaseHandler trusts request 0's header, which any client may send: in a batch of
        return len(self.context.request_ids or {}) == 1 and super()._is_describe()  # more, all 503 (1 answer)

    def _is_explain(self):
        """BaseHandler asks request 0 only, but one batch may mix /predictions and /explanations requests."""
        n = len(self.context.request_processor or []) if self.context is not None else 0
        self.explaining = {i for i in range(n) if self.context.get_request_header(i, "explain") == "True"}
        return bool(self.explaining)

    def explain_handle(self, batch: Batch, raw_data: list[dict]) -> list[str]:
        """An explanation for each explanation request; the batch's prediction requests answered as usual."""
        answers = {}
        for i in sorted(self.explaining - set(batch.errors)):
            try:
                answers[i] = explain_request(
                    self.forward, batch.canvas[[k for k, o in enumerate(batch.owners) if o == i]], batch.requests[i],
                    settings=self.settings, output=self.graph_output, class_names=self.class_names,
                    headers=self.context.get_all_request_header(i), crop_size=self.crop_size,
                    model_name=self.model_name, model_version=self.model_version)
            except Exception as e:  # this request's alone: a RequestError as it is, anything else its 500
                if not isinstance(e, RequestError):
                    log.exception("%s: an explanation failed", self.model_name)
                batch.errors[i] = e if isinstance(e, RequestError) else RequestError(
                    f"the explanation failed: {failure_reason(e)}", status=500, error="internal error")
        keep = [k for k, o in enumerate(batch.owners) if o not in self.explaining]
        batch.canvas, batch.owners = (batch.canvas[keep] if keep else None), [batch.owners[k] for k in keep]
        out = self.postprocess(self.inference(batch))  # predictions, every error, content types, metrics
        return [answers.get(i, body) for i, body in enumerate(out)]

    def _record_metrics(self, batch: Batch, statuses: list[int]) -> None:
        """Per batch: the stage timings as histograms (s) and gauges (ms), the gauges and counters of inference.metrics."""
        metrics = getattr(self.context, "metrics", None) if self.context is not None else None
        if metrics is None:
            return
        sizing = self.worker_threads
        for name, value, extra in batch_metrics(batch, views=self.metric_views, adaptive=self.adaptive,
                                                threads=sizing.threads, workers=sizing.workers, error_statuses=statuses):
            kind, unit, _ = METRICS[name]
            dims = [Dimension(d, v) for d, v in zip(dimensions(name), (self.model_name, "Model", *extra), strict=True)]
            metrics.add_metric(name, value, unit, None, dims, metric_type=MetricTypes(kind))

    def describe_handle(self) -> str:
        """``GET /models/NAME?customized=true``: the archive's model_card.json, as ``customizedMetadata``."""
        path = os.path.join(self.context.system_properties["model_dir"], MODEL_CARD_FILE)
        if not os.path.isfile(path):
            return json.dumps({"error": f"this archive has no {MODEL_CARD_FILE} (`python -m export archive` packs one)"})
        with open(path) as f:
            return json.dumps(json.load(f))
