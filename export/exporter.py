"""Checkpoint -> every requested graph variant, each verified, listed in ``export.json``: one transaction.

Every graph is written and verified in a staging folder inside the output folder
(:mod:`export.staging`); only the accepted ones, ``index_to_name.json`` and the merged
``export.json`` (:mod:`export.manifest`) are then moved in. A refused variant, a failure or a
crash leaves the earlier graphs and ``export.json`` as they were.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

import torch

from inference.atomic import write_json
from inference.backends import load_backend
from inference.class_index import INDEX_FILE, write_index_to_name
from inference.transforms import normalize
from inference.tta import cuts_from_resize
from training.checkpoint import load_checkpoint, restore_model
from training.evaluation import check_tta

from .formats import (
    VARIANTS,
    Variant,
    export_onnx,
    export_torchscript,
    files_of,
    fp32_counterpart,
    onnx_to_fp16,
    onnx_to_int8,
    onnx_to_openvino,
)
from .image_sets import DEFAULT_EVAL_IMAGES, EvalSet, load_calibration, load_eval_set, load_labelled
from .int8 import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_REVERTS,
    Budget,
    attention_scopes,
    kept_layers,
    onnx_int8,
    onnx_node_name,
    openvino_int8,
    within_budget,
)
from .integrity import file_hashes, sha256
from .manifest import (
    EXPORT_MANIFEST,
    MODEL_FACTS,
    PROVENANCE,
    check_foreign_files,
    check_same_model,
    merge,
    read_manifest,
)
from .speed import describe as describe_speed
from .speed import int8_speedup
from .splits import DEFAULT_CALIB_IMAGES, DEFAULT_VAL_IMAGES, held_out
from .staging import Staging, one_export, recover
from .verify import DEFAULT_MAX_DROP, compare, format_table, problems, run_backend
from .wrappers import DEFAULT_GRAPH_TOPK, DEFAULT_GRAPH_TTA, FusedNormalization, InGraphTopK, InGraphTTA

__all__ = ["EXPORT_MANIFEST", "Exporter", "RefusedVariants", "int8_summary", "sha256"]

NEEDS_ONNX = {v.name for v in VARIANTS.values() if v.source == "onnx"}
NEEDS_CALIBRATION = {v.name for v in VARIANTS.values() if v.precision == "int8"}
FP32_SOURCE = {n: fp32_counterpart(VARIANTS[n]).name for n in NEEDS_CALIBRATION}  # each INT8 graph's speed reference


class Exporter:
    def __init__(self, checkpoint: str, out: str, *, graph_tta: str = DEFAULT_GRAPH_TTA, graph_topk: int = DEFAULT_GRAPH_TOPK):
        self.checkpoint = checkpoint
        self.out = out
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        self.checkpoint_sha256 = sha256(checkpoint)  # of the bytes loaded: checked again once they are
        self.spec, state_dict, self.ckpt = load_checkpoint(checkpoint)
        self.model = restore_model(self.spec, state_dict, source=checkpoint)
        if sha256(checkpoint) != self.checkpoint_sha256:
            raise ValueError(f"{checkpoint} changed while it was read (is training still writing it?); try again")
        self.base = FusedNormalization(self.model, mean=self.spec.mean, std=self.spec.std).eval()
        self.graph_tta = graph_tta
        if graph_topk < 1:
            raise ValueError(f"--graph-topk must be at least 1, got {graph_topk}")
        self.graph_topk = min(graph_topk, self.spec.num_classes)
        self.int8_reports: dict[str, dict] = {}  # accuracy control of this run's INT8 variants
        self.validation = None  # (images, labels, source) of the held-out validation split, for INT8
        self.budget = Budget()
        self.keep_fp32: list[str] = []  # speed-only INT8: layers left fp32 (see run)
        self.max_reverts = DEFAULT_MAX_REVERTS

    # -- what each variant's graph is, and its eager reference -------------------------------------
    def input_size(self, variant: Variant) -> int:
        return self.spec.resize_size if variant.name == "onnx-tta" and cuts_from_resize(self.graph_tta) \
            else self.spec.input_size

    def module(self, variant: Variant) -> torch.nn.Module:
        if variant.name == "onnx-tta":
            return InGraphTTA(self.base, mode=self.graph_tta, crop_size=self.spec.input_size)
        if variant.name == "onnx-topk":
            return InGraphTopK(self.base, k=self.graph_topk)
        return self.base

    def example(self, variant: Variant) -> torch.Tensor:
        s = self.input_size(variant)
        return torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8)

    @torch.no_grad()
    def reference(self, variant: Variant, evalset: EvalSet) -> torch.Tensor:
        if variant.output == "probabilities":
            images = evalset.full if cuts_from_resize(self.graph_tta) else evalset.crops
            return self.module(variant)(images)
        return self.model(normalize(evalset.crops, mean=self.spec.mean, std=self.spec.std))

    def graph_input(self, variant: Variant, evalset: EvalSet) -> torch.Tensor:
        return evalset.full if self.input_size(variant) != self.spec.input_size else evalset.crops

    # -- writing --------------------------------------------------------------------------------------
    def write(self, variant: Variant, calibration: torch.Tensor | None, *, folder: str) -> str:
        """Write ``variant`` into ``folder`` (derived variants read ``folder``'s fp32 ONNX); return its path."""
        path = os.path.join(folder, variant.filename)
        onnx_fp32 = os.path.join(folder, VARIANTS["onnx"].filename)
        if variant.runtime == "torchscript":
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[variant.precision]
            module = FusedNormalization(self.spec.build().eval(), mean=self.spec.mean, std=self.spec.std, dtype=dtype)
            module.model.load_state_dict(self.model.state_dict())
            export_torchscript(module, self.example(variant), path)
        elif variant.name in ("onnx", "onnx-tta"):
            export_onnx(self.module(variant), self.example(variant), path,
                        output_names=["logits" if variant.output == "logits" else "probabilities"])
        elif variant.name == "onnx-topk":
            export_onnx(self.module(variant), self.example(variant), path, output_names=["probabilities", "indices"])
        elif variant.name == "onnx-fp16":
            onnx_to_fp16(onnx_fp32, path)
        elif variant.name == "onnx-int8" and self.validation is None:  # speed-only: nothing to control on
            onnx_to_int8(onnx_fp32, path, calibration, exclude=[onnx_node_name(n) for n in self.keep_fp32])
        elif variant.name == "onnx-int8":
            ov_report = self.int8_reports.get("openvino-int8") or self.openvino_int8(
                onnx_fp32, os.path.join(folder, ".oracle_ov_int8.xml"), calibration)
            images, labels, _ = self.validation
            self.int8_reports[variant.name] = onnx_int8(
                onnx_fp32, path, calibration=calibration, val_images=images, val_labels=labels, budget=self.budget,
                exclude=list(dict.fromkeys(ov_report["kept_fp32"] + ov_report["ignored_scope"])), log=self.log)
        elif variant.name == "openvino":
            onnx_to_openvino(onnx_fp32, path)
        elif variant.name == "openvino-int8" and self.validation is None:
            onnx_to_openvino(onnx_fp32, path, calibration=calibration, ignored=self.keep_fp32,
                             patterns=attention_scopes(self.model))  # the gates whole, as the controlled export
        elif variant.name == "openvino-int8":
            self.int8_reports[variant.name] = self.openvino_int8(onnx_fp32, path, calibration)
        return path

    def openvino_int8(self, onnx_fp32: str, path: str, calibration: torch.Tensor) -> dict:
        images, labels, _ = self.validation
        return openvino_int8(onnx_fp32, path, calibration=calibration, val_images=images, val_labels=labels,
                             budget=self.budget, ignored=attention_scopes(self.model), max_reverts=self.max_reverts,
                             log=self.log)

    def int8_speed(self, name: str, path: str, evalset: EvalSet, *, folder: str) -> dict:
        """:func:`export.speed.int8_speedup` of INT8 graph ``name`` against its fp32 graph (written into ``folder``
        for the comparison if this run did not ask for it: staging keeps only what is committed)."""
        fp32 = VARIANTS[FP32_SOURCE[name]]
        fp32_path = os.path.join(folder, fp32.filename)
        if not os.path.exists(fp32_path):
            self.write(fp32, None, folder=folder)
        return int8_speedup(fp32_path, path, self.graph_input(VARIANTS[name], evalset))

    def outputs(self, variant: Variant) -> list[dict]:
        n = self.spec.num_classes
        if variant.output == "topk":
            return [{"name": "probabilities", "dtype": "float32", "shape": ["N", self.graph_topk]},
                    {"name": "indices", "dtype": "int64", "shape": ["N", self.graph_topk]}]
        return [{"name": variant.output, "dtype": "float32", "shape": ["N", n]}]

    @torch.no_grad()
    def reference_accuracy(self, evalset: EvalSet) -> float | None:
        """The eager model's top-1 accuracy on ``evalset`` (None: its images have no labels)."""
        if evalset.labels is None:
            return None
        logits = self.model(normalize(evalset.crops, mean=self.spec.mean, std=self.spec.std))
        return (logits.argmax(1) == evalset.labels).float().mean().item()

    def measure(self, variant: Variant, backend, evalset: EvalSet) -> dict:
        """``variant``'s graph, loaded in ``backend``, against the eager model on ``evalset``: the numbers of
        :func:`export.verify.compare`, ms per image, images and the runtime's providers."""
        output, ms = run_backend(backend, self.graph_input(variant, evalset))
        result = compare(output, self.reference(variant, evalset), kind=variant.output, labels=evalset.labels,
                         k=min(5, self.spec.num_classes))
        return {**result, "ms_per_image": ms, "images": len(evalset.crops), "runtime": backend.providers}

    def check(self, variant: Variant, path: str, evalset: EvalSet, *, ref_acc: float | None,
              max_drop: float) -> tuple[dict, list[str]]:
        """Run the written graph against the eager model: ``(numbers, problems)``."""
        result = self.measure(variant, load_backend(path), evalset)
        bad = problems(variant.precision, result, reference_accuracy=ref_acc, max_drop=max_drop,
                       min_agreement=self.budget.min_agreement)
        report = self.int8_reports.get(variant.name)
        if report is not None:
            result["validation"] = report["validation"]
            result["kept_fp32"] = len(report["kept_fp32"])
            if not within_budget(report):
                v = report["validation"]
                bad.append(f"breaks the INT8 budget on the validation split even with {len(report['kept_fp32'])} "
                           f"layers in fp32 (accuracy {v['accuracy']:.2%} vs {v['fp32_accuracy']:.2%}, agreement "
                           f"{v['top1_agreement']:.2%})")
        return result, bad

    def entry(self, variant: Variant, *, folder: str, parity: dict, provenance: dict) -> dict:
        files = [os.path.basename(f) for f in files_of(variant, folder)]
        size = self.input_size(variant)
        int8 = {"int8": self.int8_reports[variant.name]} if variant.name in self.int8_reports else {}
        if variant.precision == "int8" and variant.name not in self.int8_reports:  # what the graph kept, read back
            int8 = {"speed_only_kept_fp32": kept_layers(os.path.join(folder, variant.filename))}
        return {**variant.describe(), **int8, "files": files, "sha256": file_hashes(folder=folder, files=files),
                "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, size, size]},
                "input_size": size, "outputs": self.outputs(variant),
                "tta": self.graph_tta if variant.output == "probabilities" else "none",
                "topk": self.graph_topk if variant.output == "topk" else None, "parity": parity,
                "gate": {"max_drop": self.budget.max_drop, "min_agreement": self.budget.min_agreement}, **provenance}

    # -- the whole run -----------------------------------------------------------------------------
    def run(self, names: list[str], *, data: str | None = None, calib_data: str | None = None,
            eval_images: int = DEFAULT_EVAL_IMAGES, calib_images: int = DEFAULT_CALIB_IMAGES, max_drop: float = DEFAULT_MAX_DROP,
            val_data: str | None = None, val_images: int = DEFAULT_VAL_IMAGES, min_agreement: float | None = None,
            val_margin: float = DEFAULT_MARGIN, max_reverts: int = DEFAULT_MAX_REVERTS, speed_only: bool = False,
            keep_fp32: list[str] = (), log=print) -> dict:
        """Write, verify and move in ``names``; return the folder's ``export.json`` as it now is.

        INT8 variants are accuracy-controlled (:mod:`export.int8`): calibrated on training images and
        judged on held-out validation images (:mod:`export.splits`), then gated on ``data`` like the others.
        ``speed_only``: allow INT8 without labelled ``data`` (benchmarks of random-weight models): plain
        post-training INT8 on ``calib_data``, accuracy unchecked, and the manifest says so; ``keep_fp32``:
        the OpenVINO layer names such INT8 graphs leave in fp32 (those that the accuracy-controlled export of
        a trained model of the same architecture kept, so that the speed measured is that of a graph that
        keeps accuracy; recorded in the entry as ``speed_only_kept_fp32``)."""
        self.log = log
        self.keep_fp32 = list(keep_fp32)
        int8 = NEEDS_CALIBRATION & set(names)
        _check_options(int8=bool(int8), speed_only=speed_only, data=data, calib_data=calib_data, val_data=val_data,
                       val_margin=val_margin, max_drop=max_drop, min_agreement=min_agreement, max_reverts=max_reverts,
                       counts={"--eval-images": eval_images, "--calib-images": calib_images, "--val-images": val_images})
        if "onnx-tta" in names:
            check_tta(self.graph_tta, self.spec, option="--graph-tta")
        self.max_reverts = max_reverts
        self.budget = Budget(max_drop=max_drop, min_agreement=self.budget.min_agreement if min_agreement is None
                             else min_agreement, margin=val_margin)
        with one_export(self.out):  # a second export into OUT is refused while this one runs
            recover(out=self.out, log=log)
            earlier = read_manifest(self.out)
            check_same_model(earlier=earlier, facts=self.facts(), export_dir=self.out)
            check_foreign_files(earlier=earlier, files=[f for n in names for f in files_of(VARIANTS[n], "")],
                                shared=(INDEX_FILE, EXPORT_MANIFEST), export_dir=self.out, checkpoint=self.checkpoint)
            ordered = _write_order(names)
            evalset = load_eval_set(data, self.spec, count=eval_images)
            calibration = None
            if int8:
                calibration = self.int8_inputs(speed_only=speed_only and data is None, calib_data=calib_data,
                                               val_data=val_data, val_images=val_images, calib_images=calib_images,
                                               test_paths=evalset.paths)
            ref_acc = self.reference_accuracy(evalset)
            run = self.manifest({}, ref_acc, evalset.source)
            run["speed_only"] = bool(speed_only and evalset.labels is None)
            provenance = {k: run[k] for k in PROVENANCE}
            entries, rows, refused = {}, {}, {}
            with Staging(out=self.out) as staging:
                for name in ordered:
                    variant = VARIANTS[name]
                    if name in NEEDS_ONNX and "onnx" in refused:
                        refused[name] = ["its source, the fp32 onnx graph, was refused"]
                        continue
                    path = self.write(variant, calibration, folder=staging.path)
                    rows[name], bad = self.check(variant, path, evalset, ref_acc=ref_acc, max_drop=max_drop)
                    if name in FP32_SOURCE:
                        rows[name]["speed_vs_fp32"] = self.int8_speed(name, path, evalset, folder=staging.path)
                    if bad:
                        refused[name] = bad
                    elif name in names:  # not the fp32 ONNX written only as the source of other variants
                        entries[name] = self.entry(variant, folder=staging.path, parity=rows[name], provenance=provenance)
                log(f"parity against eager fp32 on {evalset.source}:")
                log(format_table(rows, reference_accuracy=ref_acc))
                for line in int8_summary(rows, self.int8_reports):
                    log(line)
                manifest = merge(earlier=earlier, run=run, entries=entries)
                older = [name for name, e in manifest["variants"].items()
                         if name not in entries and e.get("checkpoint_sha256") != run["checkpoint_sha256"]]
                if older:  # a variant refused (or not asked for) this time keeps its earlier graph, of other weights
                    log(f"kept from an earlier checkpoint, not this one: {', '.join(older)} (their model cards say which; "
                        "`export verify` flags them and `export archive` refuses them; re-export them or export into a "
                        "new folder)")
                if entries:
                    write_index_to_name(staging.file(INDEX_FILE), self.spec.class_names)
                    write_json(path=staging.file(EXPORT_MANIFEST), obj=manifest)
                    staging.commit([f for e in entries.values() for f in e["files"]] + [INDEX_FILE, EXPORT_MANIFEST])
            if refused:
                raise RefusedVariants(refused)
            return manifest

    def int8_inputs(self, *, speed_only: bool, calib_data: str | None, val_data: str | None, val_images: int,
                    calib_images: int, test_paths: tuple[str, ...] = ()) -> torch.Tensor:
        """INT8's calibration images (returned) and, unless ``speed_only``, its held-out validation images
        (``self.validation``) from :func:`export.splits.held_out`."""
        if speed_only:
            calibration = load_calibration(calib_data, self.spec, count=calib_images)
            self.log(f"calibration (speed-only INT8, accuracy unchecked): {len(calibration)} images of {calib_data}")
            return calibration
        split = held_out(checkpoint_config=self.ckpt.get("config") or {}, class_names=self.spec.class_names,
                         val_data=val_data, calib_data=calib_data, val_images=val_images, calib_images=calib_images,
                         selection=self.ckpt.get("selection"), test_paths=test_paths)
        calibration = load_calibration(split.calib_paths, self.spec, count=calib_images)
        images, labels = load_labelled(split.val_paths, split.val_labels, self.spec)
        self.validation = (images, labels, split.val_source)
        self.log(f"INT8: calibration on {len(calibration)} read of {split.calib_source}; accuracy control on "
                 f"{len(images)} read of {split.val_source} (budget on "
                 f"the test gate: <= {self.budget.max_drop} points, >= {self.budget.min_agreement:.1%} top-1 "
                 f"agreement with fp32; {self.budget.margin:.0%} of each on validation)")
        return calibration

    def facts(self) -> dict:
        values = {k: getattr(self.spec, k) for k in MODEL_FACTS}  # what every run into the folder must share
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def manifest(self, entries: dict, ref_acc: float | None, source: str) -> dict:
        return {**self.facts(), "variants": entries, "eager_accuracy": ref_acc, "verified_on": source,
                "training_metrics": self.ckpt.get("metrics", {}), "checkpoint": os.path.abspath(self.checkpoint),
                "checkpoint_sha256": self.checkpoint_sha256,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def int8_summary(rows: dict[str, dict], reports: dict[str, dict], *, where: str = "on the test gate") -> list[str]:
    """One line per INT8 row: its accuracy cost ``where``, layers kept in fp32 (``reports``: the accuracy
    control's, by variant), speed vs fp32 (:mod:`export.speed`). A row is named after its variant, or
    ``"VARIANT (LABEL)"`` as ``verify`` names its runs."""
    out = []
    for row, r in rows.items():
        report = reports.get(row.split(" (")[0])
        if report is None or "error" in r:
            continue
        cost = r.get("accuracy_change_points")
        speed = f"; {describe_speed(r['speed_vs_fp32'])}" if r.get("speed_vs_fp32") else ""
        out.append(f"{row}: accuracy {'n/a' if cost is None else f'{cost:+.2f}'} points, top-1 agreement "
                   f"{r['top1_agreement']:.2%} {where}; {len(report['kept_fp32'])} of {report['layers']} "
                   f"layers kept in fp32{': ' + ', '.join(report['kept_fp32']) if report['kept_fp32'] else ''}{speed}")
    return out


class RefusedVariants(RuntimeError):
    def __init__(self, refused: dict[str, list[str]]):
        self.refused = refused
        super().__init__("refused (not written): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in refused.items()))


def _check_options(*, int8: bool, speed_only: bool, data, calib_data, val_data, val_margin: float, max_drop: float,
                   min_agreement: float | None, max_reverts: int, counts: dict[str, int]) -> None:
    """:meth:`Exporter.run`'s options, refused with one clear line before anything is written."""
    if int8 and speed_only and calib_data is None:
        raise ValueError("speed-only INT8 variants need calibration images (calib_data)")
    if int8 and data is None and not speed_only:
        raise ValueError("INT8 variants need --data (labelled test images: the final accuracy gate); they are "
                         "calibrated on training images and judged on the validation split first")
    if not 0 < val_margin <= 1:
        raise ValueError(f"--val-margin must be in (0, 1], got {val_margin}")
    for option, path in (("--val-data", val_data), ("--calib-data", calib_data)):
        if path and data and os.path.realpath(path) == os.path.realpath(data):
            raise ValueError(f"{option} is --data ({data}): the test images judge the graph last, so INT8 "
                             "must be calibrated and controlled on other images (the default: the training run's)")
    if not max_drop >= 0:
        raise ValueError(f"--max-drop is in top-1 points and must be >= 0, got {max_drop}")
    if min_agreement is not None and not 0 < min_agreement <= 1:
        raise ValueError(f"--min-agreement is a share in (0, 1] (0.99 for 99%), got {min_agreement}")
    if max_reverts < 1:
        raise ValueError(f"--max-reverts must be at least 1, got {max_reverts}")
    for option, count in counts.items():
        if count < 1:
            raise ValueError(f"{option} must be at least 1, got {count}")


def _write_order(names: list[str]) -> list[str]:
    """The order variants are written in: the fp32 ONNX first when another is converted from it (written only
    as their source when not asked for), ONNX INT8 after OpenVINO INT8 (it leaves out what OpenVINO's kept)."""
    ordered = (["onnx"] if NEEDS_ONNX & set(names) and "onnx" not in names else []) + names
    if "onnx-int8" in ordered and "openvino-int8" in ordered:
        ordered.remove("onnx-int8")
        ordered.insert(ordered.index("openvino-int8") + 1, "onnx-int8")
    return ordered
