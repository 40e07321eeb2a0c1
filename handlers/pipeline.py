"""The handler's pure functions: request reading, per-request options, top-k formatting, errors.

Each is tested without TorchServe. Flat-importable (no relative imports): it travels inside the
``.mar``.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

import torch

TOPK_HEADER = "x-top-k"


@dataclass
class Batch:
    """What the handler's preprocess hands to inference and postprocess."""
    size: int
    images: torch.Tensor | None = None          # (M, 3, S, S) uint8 for the M valid requests
    valid: list[int] = field(default_factory=list)
    topk: dict[int, int] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)
    values: torch.Tensor | None = None          # (M, k) top-k probabilities, sorted
    indices: torch.Tensor | None = None         # (M, k) their class indices


class RequestError(ValueError):
    """A per-request problem: answered with ``status`` and a JSON body, never failing the batch."""

    def __init__(self, message: str, *, status: int = 400, error: str = "bad request"):
        super().__init__(message)
        self.status = status
        self.error = error


def read_body(row: dict) -> bytes | bytearray:
    """The image bytes of one TorchServe request row.

    Accepts a raw body (``{"body": bytes}``), a multipart form (the first file field, any name), or
    JSON ``{"data": "<base64>"}`` (TorchServe hands JSON over already parsed as a dict).
    """
    if not row:
        raise RequestError("empty request: send image bytes as the body or as a multipart file field",
                           error="empty body")
    value = row.get("body", row.get("data"))
    if value is None:  # multipart: one key per form field
        value = next((v for v in row.values() if isinstance(v, (bytes, bytearray))), None)
    if isinstance(value, dict):
        return _base64_image(value)
    if isinstance(value, str):
        raise RequestError("the body was sent as text; send image bytes with an image/* content type, or JSON "
                           '{"data": "<base64 image>"}', status=415, error="unsupported media type")
    if not isinstance(value, (bytes, bytearray)):
        raise RequestError("no image found in the request: send image bytes as the body or as a multipart file "
                           "field", error="missing image")
    return value


def _base64_image(body: dict) -> bytes:
    data = body.get("data")
    if not isinstance(data, str):
        raise RequestError('JSON bodies must look like {"data": "<base64-encoded image>"}', error="bad json")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f'"data" is not valid base64: {e}', error="bad base64") from None


def header(headers: dict | None, name: str) -> str | None:
    """Case-insensitive header lookup (TorchServe keeps the client's case)."""
    for key, value in (headers or {}).items():
        if key.lower() == name:
            return value.decode() if isinstance(value, (bytes, bytearray)) else value
    return None


def parse_topk(headers: dict | None, *, default: int, num_classes: int) -> int:
    value = header(headers, TOPK_HEADER)
    if value is None:
        return min(default, num_classes)
    try:
        k = int(str(value).strip())
    except ValueError:
        raise RequestError(f"X-Top-K must be an integer between 1 and {num_classes}, got {value!r}",
                           error="bad top-k") from None
    if not 1 <= k <= num_classes:
        raise RequestError(f"X-Top-K must be between 1 and {num_classes}, got {k}", error="bad top-k")
    return k


def topk_predictions(values: torch.Tensor, indices: torch.Tensor, ks: list[int],
                     class_names: list[str]) -> list[list[dict]]:
    """Sorted top-k ``(N, >= max(ks))`` -> per row its ``ks[i]`` best classes as ``{"class", "index", "confidence"}``."""
    values, indices = values.tolist(), indices.tolist()
    return [[{"class": class_names[j], "index": j, "confidence": round(p, 6)} for p, j in zip(v[:k], ix[:k])]
            for v, ix, k in zip(values, indices, ks)]


def error_body(error: str, detail: str) -> str:
    return json.dumps({"error": error, "detail": detail})
