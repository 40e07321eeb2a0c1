"""Answering one explanation request (the handler's ``/explanations`` route and KServe v1 ``:explain``):
whether it asks for the overlay, its limits, the occlusion maps of :mod:`inference.explain` through the
model's forward, and the answer body in the request's protocol (:data:`inference.protocols.REGISTRY`).
"""
from __future__ import annotations

import base64
import json
import logging
from typing import Callable

import torch

from inference.explain import METHOD, OUTPUTS, occlusion, render_overlay
from inference.protocols import bounded, lookup
from inference.requests import OVERLAY_FIELD, Request, RequestError, header, shown
from inference.responses import failure_reason, float32_values
from inference.tta import tta_views

log = logging.getLogger(__name__)

OVERLAY_HEADER = "x-explain-overlay"   # X-Explain-Overlay: true|false


def overlay_requested(headers: dict | None, req: Request, *, default: bool) -> bool:
    """Whether a request asks for the overlay: an ``overlay`` field of its JSON body (or of KServe v1's
    ``parameters``; ``req.overlay``, read however the body came: compressed, or JSON without a JSON content
    type), else the ``X-Explain-Overlay`` header, else ``default``."""
    value, where = header(headers, OVERLAY_HEADER), "X-Explain-Overlay"
    if req.overlay is not None:
        value, where = req.overlay, f'"{OVERLAY_FIELD}"'
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise RequestError(f"{where} must be true or false, got {shown(value)}", error="bad request")


def explain_request(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, req: Request, *,
                    settings, output: str, class_names: list[str], headers: dict | None = None,
                    crop_size: int | None = None, model_name: str = "",
                    model_version: str = "") -> str:
    """The answer body of one explanation request whose decoded images are ``images`` (uint8 canvases:
    their center ``crop_size`` square, the handler's plain view, is what is explained). ``settings``: the
    handler's :class:`inference.settings.HandlerSettings` (its ``explain_*`` fields). Raises
    :class:`RequestError`: 501 for a top-k graph or the Open Inference Protocol, 413 beyond
    ``explain_max_images``, 400 for a bad option, 500 when the model fails."""
    protocol = lookup(req.protocol)
    if protocol.explanations is None:
        raise RequestError("explanations are answered on /explanations/NAME and KServe v1 "
                           f"/v1/models/NAME:explain, not in {protocol.title}", status=501,
                           error="not implemented")
    if output not in OUTPUTS:
        raise RequestError(f"this archive's graph returns only its top-{settings.graph_topk or 'k'} classes, "
                           "not every class's score, so it cannot be explained: serve the onnx, openvino or "
                           "torchscript variant of the model for explanations", status=501, error="not implemented")
    if len(req.images) > settings.explain_max_images:
        raise RequestError(f"{len(req.images)} images in one explanation request; the limit is "
                           f"{settings.explain_max_images} (each costs {settings.explain_grid ** 2 + 1} forwards)",
                           status=413, error="too many images")
    overlay = overlay_requested(headers, req, default=settings.explain_overlay)
    images = tta_views(images, "none", crop_size=crop_size)
    grid = min(settings.explain_grid, *images.shape[-2:])  # cells of at least one pixel
    try:
        result = occlusion(forward, images, grid=grid, fill=settings.explain_fill,
                           max_views=min(settings.explain_views_per_forward, settings.max_forward_batch),
                           output=output)
    except Exception as e:  # the model failed: this request's 500, with the cause in the log
        log.exception("%s: explaining %d images failed", model_name, len(images))
        raise RequestError(f"the model failed while explaining: {failure_reason(e)}", status=500,
                           error="inference failed") from None
    answers = []
    for k, (index, p, cells) in enumerate(zip(result.indices.tolist(), float32_values(result.probabilities),
                                              result.maps)):
        body = {"class": class_names[index], "index": index, "probability": p, "method": METHOD,
                "grid_size": grid, "fill": settings.explain_fill,
                "grid": [[round(v, 6) for v in line] for line in cells.tolist()],
                "model": model_name, "version": model_version}
        if overlay:
            body["overlay_png_base64"] = base64.b64encode(render_overlay(images[k], cells)).decode()
        answers.append(body)
    body = json.dumps(protocol.explanations(req, answers))
    too_long = bounded(body, limit=settings.max_response_bytes)  # overlays are large: TorchServe drops the worker
    if too_long:
        raise too_long
    return body
