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

    {"arch": "resnet50", "model_kwargs": {}, "input_size": 64, "variant": "openvino-int8", "passed": true,
     "accuracy_change_points": -0.31, "top1_agreement": 0.9912,
     "source": "export of runs/r50/best.pt, 10000 test images of data/.../test"}

* ``arch``: the model's architecture, as ``export.json``'s ``arch`` (``resnet50``, ``cbam_resnet``, ...);
* ``model_kwargs``: the judged model's architecture options (its widths; ``{}``: the defaults): the bench
  counts a record only for a model with the same ones (a record without them counts for none);
  ``input_size``: the size it was judged at (the bench's ResNet-50 records come from a 64-px training,
  docs/results.md: a compromise of 2 CPU cores, not a match that is checked);
* ``variant``: the export variant, as the key of ``export.json``'s ``variants`` (``openvino-int8``,
  ``onnx-int8``, ``onnx-fp16``, ...), or ``openvino-bf16`` for the fp32 OpenVINO IR run with the bf16
  inference-precision hint;
* ``passed``: the export gate's verdict (accuracy within its max drop AND top-1 agreement); a record
  that passed only under a looser budget than the project's gate (an export run with a larger
  ``--max-drop`` or a smaller ``--min-agreement``) is speed-only all the same (:func:`looser_than_the_gate`);
* ``accuracy_change_points``: the variant's top-1 minus fp32's, in points (negative: a drop);
* ``top1_agreement``: the fraction of images whose top-1 equals fp32's (0..1);
* ``source``: what was exported and judged on (checkpoint, images);
* ``kept_fp32`` (INT8; without it an INT8 record never counts): the layers the accuracy control left in fp32.
  The bench's INT8 graph of random weights then leaves the same layers in fp32
  (``tools.models.export_random_model``), read back from that graph; it counts only when it kept at least
  those, so that its speed is that of the graph that kept accuracy; a graph quantized otherwise is speed-only;
* ``runs`` (OpenVINO; written by ``records_from_verify``): ``{hint: numbers}`` of each precision hint the
  variant was judged with; it counts only for the hint the bench serves it with.

Other keys are kept and ignored. A later record for the same ``(arch, variant)`` replaces an earlier
one (append to the file as exports are redone).

Writing records: ``python -m benchmarks.gates --dir exports/NAME --data DATA/test`` re-runs every graph
of an export folder against its eager checkpoint (``python -m export verify``, the export's own
tolerances) on labelled images and records one entry per reduced-precision variant: ``passed`` only
where every precision hint it was run with passed (an INT8 IR runs with OpenVINO's f32 and bf16 hints;
the bench serves it with ``auto``), with the worst accuracy change and agreement of those runs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
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


def looser_than_the_gate(rec: dict, *, int8: bool) -> str | None:
    """Why a record that ``passed`` under the budget its export was given (``--max-drop``,
    ``--min-agreement``) does not pass the project's gate (``export.verify``'s defaults: at most 0.5
    points below fp32; INT8 agreeing with fp32's top-1 on 99% of the images, other precisions 99.5%);
    None when it does."""
    from export.verify import DEFAULT_MAX_DROP, DEFAULT_MIN_INT8_AGREEMENT, MIN_TOP1_AGREEMENT

    agreement = DEFAULT_MIN_INT8_AGREEMENT if int8 else MIN_TOP1_AGREEMENT
    if rec["accuracy_change_points"] < -DEFAULT_MAX_DROP:
        return f"passed under a looser budget than the gate's {DEFAULT_MAX_DROP} points"
    if rec["top1_agreement"] < agreement:
        return f"passed under a looser budget than the gate's {agreement:.1%} agreement"
    return None


def verdict(*, arch: str, variant_info: dict, variant: str, runtime_precision: str | None,
            gates: dict[tuple[str, str], dict], model_kwargs: dict | None = None) -> dict:
    """How a served variant is gated: ``status`` (parity / gated / speed-only), ``counts`` (whether it
    may enter ``best_gated``), ``gate_variant``, the ``record`` used and a short ``label``. With
    ``model_kwargs`` (the served model's, as ``make bench`` passes them) a record counts only when it
    was judged on a model of the same widths (the demo's narrow ``cbam_resnet`` is no gate for a full one)."""
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

    def speed_only(why: str) -> dict:
        return {"status": SPEED_ONLY, "counts": False, "gate_variant": key, "record": rec, "label": f"speed-only ({why})"}
    if model_kwargs is not None and rec.get("model_kwargs") != model_kwargs:
        return speed_only(f"the record's {arch} has model kwargs {rec.get('model_kwargs', '(not recorded)')}, "
                          f"this one {model_kwargs}")
    if variant_info.get("runtime") == "openvino" and runtime_precision not in (rec.get("runs") or {}):
        return speed_only(f"the gate never ran {key} with the {runtime_precision} hint it is served with")
    if variant_info.get("precision") == "int8":
        # the layers the measured graph kept in fp32, read from the graph itself (export.int8.kept_layers): at
        # least those the gated graph kept, else it is quantized harder than what passed, and maybe faster
        kept = variant_info.get("speed_only_kept_fp32", (variant_info.get("int8") or {}).get("kept_fp32"))
        gated = rec.get("kept_fp32")
        if kept is None or gated is None:
            return speed_only("no record of the layers " + ("this graph" if kept is None else "the gated graph")
                              + " kept in fp32")
        if missing := sorted(set(gated) - set(kept)):
            return speed_only(f"INT8 in {len(missing)} layers the gated graph kept in fp32, e.g. {missing[0]}")
    if not rec["passed"]:
        return {"status": SPEED_ONLY, "counts": False, "gate_variant": key, "record": rec,
                "label": f"speed-only (gate failed: {numbers})"}
    if why := looser_than_the_gate(rec, int8=key.endswith("int8")):  # passed only under an export's own budget
        return speed_only(f"{why}: {numbers}")
    return {"status": GATED, "counts": True, "gate_variant": key, "record": rec, "label": f"gated ({numbers})"}


# -- writing records from a verified export ------------------------------------------------------------
_ROW = re.compile(r"^(?P<variant>\S+) \((?P<label>[^)]+)\)$")  # export.audit's "NAME (HINT)" rows


def records_from_verify(rows: dict[str, dict], *, variants: dict[str, dict], arch: str, source: str,
                        model_kwargs: dict | None = None, input_size: int | None = None) -> list[dict]:
    """Gate records from ``export.audit.verify``'s rows (one per graph and precision hint or device):
    one record per reduced-precision variant, passed only where every run of it passed; each names the
    judged model's ``model_kwargs`` (its widths) and ``input_size``."""
    runs: dict[str, dict[str, dict]] = {}
    for row, result in rows.items():
        if result.get("problems") and "error" in result:  # a graph that is not the exported one
            raise ValueError(f"{row}: {result['error']}")
        m = _ROW.match(row)
        if m is None or "error" in result:  # e.g. the bf16 hint on a CPU without bf16: not run, not judged
            continue
        info = variants[m["variant"]]
        key = gate_variant(info, variant=m["variant"],
                           runtime_precision=m["label"] if info.get("runtime") == "openvino" else None)
        if key is None:
            continue
        if result.get("accuracy_change_points") is None:
            raise ValueError(f"{row}: no accuracy was measured: --data must be labelled images")
        runs.setdefault(key, {})[m["label"]] = {
            "accuracy": result["accuracy"], "accuracy_change_points": result["accuracy_change_points"],
            "top1_agreement": result["top1_agreement"], "problems": result["problems"]}
    kept = {name: info["int8"]["kept_fp32"] for name, info in variants.items() if "kept_fp32" in info.get("int8", {})}
    return [{"arch": arch, "model_kwargs": model_kwargs, "input_size": input_size, "variant": key,
             "passed": not any(r["problems"] for r in by_label.values()),
             "accuracy_change_points": min(r["accuracy_change_points"] for r in by_label.values()),
             "top1_agreement": min(r["top1_agreement"] for r in by_label.values()),
             **({"kept_fp32": kept[key]} if key in kept else {}),
             "source": source, "runs": by_label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            for key, by_label in sorted(runs.items())]


def write_records(path: str | Path, records: list[dict]) -> list[dict]:
    """Merge ``records`` into the gate file (a record replaces the one of the same arch and variant),
    written atomically; return the file's records."""
    from inference.atomic import write_json

    merged = load_gates(path)
    merged.update({(r["arch"], r["variant"]): r for r in records})
    out = sorted(merged.values(), key=lambda r: (r["arch"], r["variant"]))
    write_json(path=path, obj={"gates": out})
    return out


def record(export_dir: str, *, data: str, eval_images: int, gates: str | Path = DEFAULT_GATES, log=print) -> list[dict]:
    """Verify ``export_dir``'s graphs on ``data`` and write their gate records into ``gates``."""
    from export.audit import verify
    from export.manifest import load_manifest

    manifest = load_manifest(export_dir)
    rows = verify(export_dir, data=data, eval_images=eval_images, log=log)
    source = (f"python -m benchmarks.gates --dir {export_dir} --data {data} --eval-images {eval_images} "
              f"(checkpoint {manifest['checkpoint']}, sha256 {manifest.get('checkpoint_sha256', '?')[:12]})")
    records = records_from_verify(rows, variants=manifest["variants"], arch=manifest["arch"], source=source,
                                  model_kwargs=manifest.get("model_kwargs") or {}, input_size=manifest.get("input_size"))
    if not records:
        raise ValueError(f"{export_dir} has no reduced-precision variant to gate (export openvino-int8, onnx-int8, "
                         f"onnx-fp16 or openvino, on a CPU with bf16 for openvino-bf16)")
    before = load_gates(gates, required=False)
    for r in records:  # one record per (arch, variant): say what another model's record is replaced by
        old = before.get((r["arch"], r["variant"]))
        if old is not None and old.get("model_kwargs") != r["model_kwargs"]:
            log(f"{r['arch']}/{r['variant']}: replaces the record of a model with model kwargs "
                f"{old.get('model_kwargs', '(not recorded)')} ({old.get('source', '?')[:80]})")
    write_records(gates, records)
    for r in records:
        log(f"{r['arch']}/{r['variant']}: {'PASSED' if r['passed'] else 'FAILED'} "
            f"({r['accuracy_change_points']:+.2f} points, {r['top1_agreement']:.2%} top-1 agreement, worst of "
            f"{', '.join(r['runs'])}) -> {gates}")
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gates", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Record the accuracy gate of a trained model's reduced-precision graphs for `make bench`: "
        "re-run every graph of an export folder against its eager checkpoint on labelled images (`python -m "
        "export verify`) and write one record per variant and architecture into the gate file.")
    p.add_argument("--dir", required=True, help="export folder of a TRAINED checkpoint (`python -m export`)")
    p.add_argument("--data", required=True, help="labelled ImageFolder tree the gate is judged on (its test split)")
    p.add_argument("--eval-images", type=int, default=10000, help="images of --data used")
    p.add_argument("--gates", default=str(DEFAULT_GATES), help="gate file to merge the records into")
    args = p.parse_args(argv)
    records = record(args.dir, data=args.data, eval_images=args.eval_images, gates=args.gates)
    return 0 if all(r["passed"] for r in records) else 1


if __name__ == "__main__":
    from inference.cli import run as run_cli

    sys.exit(run_cli(main, expected=(ValueError, GateFileError)))
