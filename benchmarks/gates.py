"""Which served variants count as accuracy-gated in ``make bench``: the gate file and each variant's verdict.

The bench's models have random weights (``tools.models.export_random_model``, ``speed_only``): they
say how fast a graph is, not whether it keeps accuracy. So a variant counts in ``best_gated/stock``
only where accuracy was checked on a TRAINED model of the same architecture:

* fp32 variants (the ONNX graph, the OpenVINO IR with the f32 hint, or with the bf16 hint on a CPU
  without bf16, where it runs f32) are gated by exact parity with eager PyTorch: the export refuses an
  fp32 graph whose logits differ from eager by more than 1e-4 of their scale (``export.verify``), a
  property of the architecture's graph, not of its weights. They count (``parity``).
* reduced-precision variants (the OpenVINO bf16 hint, INT8, fp16) count only where the gate file holds
  a passing record for their architecture and variant (``gated``); without one they are ``speed-only``:
  reported in their own labelled column, never in ``best_gated``.

The gate file (``--gates``, default ``benchmarks/gates.json``; may be absent, then every
reduced-precision variant is speed-only) is JSON: a list of records, or an object whose ``"gates"``
is that list. Records are written from real exports of trained models (the accuracy-controlled
export), one per architecture and variant::

    {"arch": "resnet50", "variant": "openvino-int8", "passed": true,
     "accuracy_change_points": -0.31, "top1_agreement": 0.9912,
     "source": "export of runs/r50/best.pt, 10000 test images of data/.../test"}

* ``arch``: the model's architecture, as ``export.json``'s ``arch`` (``resnet50``, ``cbam_resnet``, ...);
* ``variant``: the export variant, as the key of ``export.json``'s ``variants`` (``openvino-int8``,
  ``onnx-int8``, ``onnx-fp16``, ...), or ``openvino-bf16`` for the fp32 OpenVINO IR run with the bf16
  inference-precision hint;
* ``passed``: the export gate's verdict (accuracy within its max drop AND top-1 agreement);
* ``accuracy_change_points``: the variant's top-1 minus fp32's, in points (negative: a drop);
* ``top1_agreement``: the fraction of images whose top-1 equals fp32's (0..1);
* ``source``: what was exported and judged on (checkpoint, images).

Other keys are kept and ignored. A later record for the same ``(arch, variant)`` replaces an earlier
one (append to the file as exports are redone).
"""
from __future__ import annotations

import json
from pathlib import Path

from tools import REPO

DEFAULT_GATES = REPO / "benchmarks" / "gates.json"
REQUIRED = {"arch": str, "variant": str, "passed": bool, "accuracy_change_points": (int, float),
            "top1_agreement": (int, float), "source": str}
PARITY, GATED, SPEED_ONLY = "parity", "gated", "speed-only"


class GateFileError(ValueError):
    """A gate file that cannot be read: the message names the file and what is wrong."""


def load_gates(path: str | Path | None = None, *, required: bool = False) -> dict[tuple[str, str], dict]:
    """``{(arch, variant): record}`` from the gate file (``{}`` where it is absent and not ``required``)."""
    path = Path(path) if path is not None else DEFAULT_GATES
    if not path.is_file():
        if required:
            raise GateFileError(f"gate file {path} not found (leave --gates out to run without one)")
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise GateFileError(f"gate file {path} is not valid JSON: {e}") from None
    records = data.get("gates") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise GateFileError(f"gate file {path}: expected a list of records or {{\"gates\": [...]}}")
    out = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise GateFileError(f"gate file {path}: record {i} is not an object")
        for key, kind in REQUIRED.items():
            if not isinstance(rec.get(key), kind) or (kind is not bool and isinstance(rec.get(key), bool)):
                raise GateFileError(f"gate file {path}: record {i} needs {key!r} ({getattr(kind, '__name__', 'number')})")
        out[(rec["arch"], rec["variant"])] = rec
    return out


def gate_variant(variant_info: dict, *, variant: str, runtime_precision: str | None = None) -> str | None:
    """The name a gate record of this served variant has, or None for an fp32 graph running fp32
    (gated by parity). ``variant_info``: its ``export.json`` entry; ``runtime_precision``: OpenVINO's
    resolved inference precision hint (``f32``/``bf16``) where the runtime is OpenVINO."""
    if variant_info.get("precision", "fp32") != "fp32":
        return variant
    if variant_info.get("runtime") == "openvino" and runtime_precision == "bf16":
        return "openvino-bf16"
    return None


def verdict(*, arch: str, variant_info: dict, variant: str, runtime_precision: str | None,
            gates: dict[tuple[str, str], dict]) -> dict:
    """How a served variant is gated: ``status`` (parity / gated / speed-only), ``counts`` (whether it
    may enter ``best_gated``), ``gate_variant``, the ``record`` used and a short ``label``."""
    key = gate_variant(variant_info, variant=variant, runtime_precision=runtime_precision)
    if key is None:
        parity = variant_info.get("parity") or {}
        rel = parity.get("max_rel_diff")
        label = "fp32 parity" + (f" (max rel diff {rel:.1e})" if isinstance(rel, (int, float)) else "")
        return {"status": PARITY, "counts": True, "gate_variant": None, "record": None, "label": label,
                "parity": parity}
    rec = gates.get((arch, key))
    if rec is None:
        return {"status": SPEED_ONLY, "counts": False, "gate_variant": key, "record": None,
                "label": f"speed-only (no gate record for {arch}/{key})"}
    numbers = f"{rec['accuracy_change_points']:+.2f} pts, {rec['top1_agreement']:.1%} agree"
    if not rec["passed"]:
        return {"status": SPEED_ONLY, "counts": False, "gate_variant": key, "record": rec,
                "label": f"speed-only (gate failed: {numbers})"}
    return {"status": GATED, "counts": True, "gate_variant": key, "record": rec, "label": f"gated ({numbers})"}
