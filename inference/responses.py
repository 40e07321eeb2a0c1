"""Answer bodies: top-k predictions with class names and confidences, and JSON error bodies."""
from __future__ import annotations

import json

import torch


def topk_predictions(values: torch.Tensor, indices: torch.Tensor, ks: list[int],
                     class_names: list[str]) -> list[list[dict]]:
    """Sorted top-k ``(N, >= max(ks))`` -> per row its ``ks[i]`` best classes as ``{"class", "index", "confidence"}``.

    A confidence is its float32 probability written with the fewest digits that read back as the same float32
    (``0.84090173``, ``1.4110349e-13``): nothing is lost where an answer carries FP32 scores (OIP, binary or
    JSON), and a small probability never reads as 0."""
    return [[{"class": class_names[j], "index": j, "confidence": p} for p, j in zip(v[:k], ix[:k])]
            for v, ix, k in zip(float32_values(values), indices.tolist(), ks)]


def top_classes(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of each row's ``k`` best scores, best first, equal scores in index order (a stable
    sort): a request's answer never depends on the k its batch neighbours asked for (``torch.topk`` orders
    ties differently for different k)."""
    values, indices = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def unanswerable_rows(values: torch.Tensor, indices: torch.Tensor, *, classes: int) -> dict[int, str]:
    """Rows no answer can be built from, with why: scores holding a NaN or an infinity (an fp16 forward that
    overflowed), or an in-graph top-k naming a class beyond the ``classes`` names."""
    bad = {k: "the model's scores for an image are not finite (NaN or infinity)"
           for k in (~torch.isfinite(values.float())).any(dim=1).nonzero().flatten().tolist()}
    for k in ((indices < 0) | (indices >= classes)).any(dim=1).nonzero().flatten().tolist():
        bad.setdefault(k, f"the model named a class beyond the archive's {classes} class names")
    return bad


def float32_values(values: torch.Tensor) -> list:
    """``values`` as Python floats in the fewest digits that read back as the same float32 (numpy's shortest
    repr), nested as the tensor is: what every answer's probabilities are written with."""
    return _floats(values.detach().float().cpu().numpy().astype(str).tolist())


def _floats(nested):
    return [_floats(v) for v in nested] if isinstance(nested, list) else float(nested)


def error_body(error: str, detail: str, *, status: int = 400) -> str:
    """``{"error": kind, "detail": message, "code": HTTP status}``: the same shape on every route, so that
    a gRPC client (TorchServe 0.12 answers gRPC OK with this body) still sees the status."""
    return json.dumps({"error": error, "detail": detail, "code": status})


OUT_OF_MEMORY = ("out of memory", "not enough memory", "failed to allocate", "bad_alloc")  # torch/CUDA, ORT, OpenVINO


def failure_reason(e: BaseException) -> str:
    """What a 500 says of an exception of the model or of ours: its type, and "out of memory" when it is that;
    not its message, which may hold paths, node names and memory totals of the server (the log has it all)."""
    text = str(e).lower()
    oom = isinstance(e, MemoryError) or any(w in text for w in OUT_OF_MEMORY)
    return f"{type(e).__name__}{': out of memory' if oom else ''} (the server's log has the cause)"
