"""``python -m export verify``: re-run the graphs of an export folder or of one ``.mar`` against the eager
model, after checking that they are the files that were exported, from that checkpoint.

* Graph files whose SHA-256 differs from ``export.json`` (or the model card) are reported, not run.
* ``--archive``: a checkpoint whose SHA-256 differs from the model card's ``checkpoint_sha256`` is
  refused (:class:`~export.integrity.IntegrityError`) before it is loaded.
* ``--dir``: an entry exported from another checkpoint than the reference is reported, not run.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import torch

from inference.backends import load_backend
from inference.class_index import MODEL_CARD_FILE

from .exporter import Exporter, int8_summary
from .formats import VARIANTS
from .image_sets import DEFAULT_EVAL_IMAGES, load_eval_set
from .integrity import check_checkpoint, hash_mismatches
from .manifest import EXPORT_MANIFEST, load_manifest
from .verify import DEFAULT_MAX_DROP, DEFAULT_MIN_INT8_AGREEMENT, effective_precision, format_table, problems
from .wrappers import DEFAULT_GRAPH_TOPK, DEFAULT_GRAPH_TTA


def _read_archive(archive: str, dest: str) -> dict:
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"archive not found: {archive}")
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{archive} is not a .mar (zip) archive: {e}") from None
    card_path = os.path.join(dest, MODEL_CARD_FILE)
    if not os.path.isfile(card_path):
        raise ValueError(f"{archive} has no {MODEL_CARD_FILE}: not built by `python -m export archive`")
    with open(card_path) as f:
        card = json.load(f)
    return {**card, "variants": {card["variant"]: card["variant_info"]}}


def _stale(info: dict, *, manifest: dict, folder: str, record: str, reference_sha256: str,
           reference: str) -> list[str]:
    """Why an entry's graph is not the one to compare (empty: it is). Entries written before graph
    hashes were recorded are compared unchecked."""
    out = []
    if "sha256" in info:
        out = hash_mismatches(folder=folder, expected=info["sha256"], files=info["files"], record=record)
    exported_from = info.get("checkpoint_sha256") or manifest.get("checkpoint_sha256")
    if exported_from and exported_from != reference_sha256:
        out.append(f"exported from the checkpoint with sha256 {exported_from}; {reference} has {reference_sha256} "
                   f"(pass the right one with --checkpoint)")
    return out


def verify(export_dir: str | None, *, data: str | None, checkpoint: str | None = None, eval_images: int = DEFAULT_EVAL_IMAGES,
           archive: str | None = None, log=print) -> dict[str, dict]:
    """Re-run every graph of an export folder (or of one ``.mar``) against the eager model.

    ONNX graphs run on ONNX Runtime's CPU EP and, where present, the CUDA EP; OpenVINO graphs with
    the f32 and the bf16 precision hint; TorchScript on the CPU and, where present, CUDA.
    """
    if eval_images < 1:
        raise ValueError(f"--eval-images must be at least 1, got {eval_images}")
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        if archive:
            manifest = _read_archive(archive, tmp)
            folder, record = tmp, f"the model card of {archive}"
            reference = checkpoint or manifest["checkpoint"]
            check_checkpoint(path=reference, expected=manifest.get("checkpoint_sha256"), record=record)
        else:
            manifest = load_manifest(export_dir)
            folder, record = export_dir, os.path.join(export_dir, EXPORT_MANIFEST)
            reference = checkpoint or manifest["checkpoint"]
        variants = manifest["variants"]
        exporter = Exporter(reference, folder,
                            graph_tta=next((v["tta"] for v in variants.values() if v["tta"] != "none"), DEFAULT_GRAPH_TTA),
                            graph_topk=next((v["topk"] for v in variants.values() if v["topk"]), DEFAULT_GRAPH_TOPK))
        if archive:  # the bytes loaded are the bytes checked
            check_checkpoint(path=reference, expected=manifest.get("checkpoint_sha256"),
                             actual=exporter.checkpoint_sha256, record=record)
        if exporter.spec.class_names != manifest["class_names"]:
            raise ValueError("the checkpoint's classes differ from the exported graphs'")
        return _compare_all(exporter, manifest, folder=folder, record=record, reference=reference, data=data,
                            eval_images=eval_images, log=log)


def _compare_all(exporter: Exporter, manifest: dict, *, folder: str, record: str, reference: str,
                 data: str | None, eval_images: int, log) -> dict[str, dict]:
    evalset = load_eval_set(data, exporter.spec, count=eval_images)
    ref_acc = exporter.reference_accuracy(evalset)
    rows = {}
    cuda = torch.cuda.is_available()
    for name, info in manifest["variants"].items():
        variant = VARIANTS[name]
        stale = _stale(info, manifest=manifest, folder=folder, record=record, reference_sha256=exporter.checkpoint_sha256,
                       reference=reference)
        if stale:
            rows[name] = {"error": "not run: " + "; ".join(stale), "problems": stale}
            continue
        path = os.path.join(folder, info["files"][0])
        runs = [("cpu", {})]
        if variant.runtime == "openvino":
            runs = [("f32", {"precision": "f32"}), ("bf16", {"precision": "bf16"})]
        elif cuda:
            runs.append(("cuda", {"device": torch.device("cuda")}))
        for label, kwargs in runs:
            row = f"{name} ({label})"
            try:
                backend = load_backend(path, **kwargs)
            except Exception as e:  # the bf16 hint on a CPU without bf16: reported, not a problem of the graph
                rows[row] = {"error": f"not run: {e}"}
                if label != "bf16":  # a graph that cannot be run at all is not verified
                    rows[row]["problems"] = [f"could not be loaded: {' '.join(str(e).split())[:300]}"]
                continue
            result = exporter.measure(variant, backend, evalset)
            gate = info.get("gate", {})  # the gate the export applied (exports before it was recorded: defaults)
            bad = problems(effective_precision(variant.precision, hint=label), result, reference_accuracy=ref_acc,
                           max_drop=gate.get("max_drop", DEFAULT_MAX_DROP), cuda=label == "cuda",
                           min_agreement=gate.get("min_agreement", DEFAULT_MIN_INT8_AGREEMENT))
            result["problems"] = bad
            rows[row] = result
    log(f"verification against eager fp32 on {evalset.source}:")
    log(format_table(rows, reference_accuracy=ref_acc))
    reports = {name: info["int8"] for name, info in manifest["variants"].items() if "int8" in info}
    for line in int8_summary(rows, reports, where=f"on {evalset.source}"):
        log(line)
    return rows
