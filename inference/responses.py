"""Answer bodies: top-k predictions with class names and confidences, and JSON error bodies."""
from __future__ import annotations

import json

import torch


def topk_predictions(values: torch.Tensor, indices: torch.Tensor, ks: list[int],
                     class_names: list[str]) -> list[list[dict]]:
    """Sorted top-k ``(N, >= max(ks))`` -> per row its ``ks[i]`` best classes as ``{"class", "index", "confidence"}``."""
    values, indices = values.tolist(), indices.tolist()
    return [[{"class": class_names[j], "index": j, "confidence": round(p, 6)} for p, j in zip(v[:k], ix[:k])]
            for v, ix, k in zip(values, indices, ks)]


def error_body(error: str, detail: str, *, status: int = 400) -> str:
    """``{"error": kind, "detail": message, "code": HTTP status}``: the same shape on every route, so that
    a gRPC client (TorchServe 0.12 answers gRPC OK with this body) still sees the status."""
    return json.dumps({"error": error, "detail": detail, "code": status})
