"""Checkpoint -> every requested graph variant, each verified, listed in ``export.json``."""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone

import torch

from inference.backends import load_backend
from inference.class_index import INDEX_FILE, write_index_to_name
from inference.transforms import normalize
from training.checkpoint import load_checkpoint, load_model

from .formats import (
    VARIANTS,
    Variant,
    _trace_frozen,
    export_onnx,
    files_of,
    onnx_to_fp16,
    onnx_to_int8,
    onnx_to_openvino,
)
from .verify import (
    DEFAULT_MAX_DROP,
    EvalSet,
    compare,
    effective_precision,
    format_table,
    load_calibration,
    load_eval_set,
    problems,
    run_backend,
)
from .wrappers import FusedNormalization, InGraphTopK, InGraphTTA

EXPORT_MANIFEST = "export.json"
NEEDS_ONNX = {"onnx-fp16", "onnx-int8", "openvino", "openvino-int8"}
NEEDS_CALIBRATION = {"onnx-int8", "openvino-int8"}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Exporter:
    def __init__(self, checkpoint: str, out: str, *, graph_tta: str = "flip", graph_topk: int = 5):
        self.checkpoint = checkpoint
        self.out = out
        self.spec, self.model = load_model(checkpoint)
        _, _, self.ckpt = load_checkpoint(checkpoint)
        self.base = FusedNormalization(self.model, mean=self.spec.mean, std=self.spec.std).eval()
        self.graph_tta = graph_tta
        self.graph_topk = min(graph_topk, self.spec.num_classes)
        os.makedirs(out, exist_ok=True)

    # -- what each variant's graph is, and its eager reference -------------------------------------
    def input_size(self, variant: Variant) -> int:
        return self.spec.resize_size if variant.name == "onnx-tta" and self.graph_tta != "flip" \
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
            images = evalset.full if self.graph_tta != "flip" else evalset.crops
            return self.module(variant)(images)
        return self.model(normalize(evalset.crops, mean=self.spec.mean, std=self.spec.std))

    def graph_input(self, variant: Variant, evalset: EvalSet) -> torch.Tensor:
        return evalset.full if self.input_size(variant) != self.spec.input_size else evalset.crops

    # -- writing --------------------------------------------------------------------------------------
    def write(self, variant: Variant, calibration: torch.Tensor | None) -> str:
        path = os.path.join(self.out, variant.filename)
        onnx_fp32 = os.path.join(self.out, VARIANTS["onnx"].filename)
        if variant.runtime == "torchscript":
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[variant.precision]
            module = FusedNormalization(self.spec.build().eval(), mean=self.spec.mean, std=self.spec.std, dtype=dtype)
            module.model.load_state_dict(self.model.state_dict())
            _trace_frozen(module, self.example(variant), path)
        elif variant.name in ("onnx", "onnx-tta"):
            export_onnx(self.module(variant), self.example(variant), path,
                        output_names=["logits" if variant.output == "logits" else "probabilities"])
        elif variant.name == "onnx-topk":
            export_onnx(self.module(variant), self.example(variant), path, output_names=["probabilities", "indices"])
        elif variant.name == "onnx-fp16":
            onnx_to_fp16(onnx_fp32, path)
        elif variant.name == "onnx-int8":
            onnx_to_int8(onnx_fp32, path, calibration)
        elif variant.name == "openvino":
            onnx_to_openvino(onnx_fp32, path)
        elif variant.name == "openvino-int8":
            onnx_to_openvino(onnx_fp32, path, calibration=calibration)
        return path

    def outputs(self, variant: Variant) -> list[dict]:
        n = self.spec.num_classes
        if variant.output == "topk":
            return [{"name": "probabilities", "dtype": "float32", "shape": ["N", self.graph_topk]},
                    {"name": "indices", "dtype": "int64", "shape": ["N", self.graph_topk]}]
        return [{"name": variant.output, "dtype": "float32", "shape": ["N", n]}]

    # -- the whole run -----------------------------------------------------------------------------
    def run(self, names: list[str], *, data: str | None = None, calib_data: str | None = None,
            eval_images: int = 500, calib_images: int = 300, max_drop: float = DEFAULT_MAX_DROP,
            speed_only: bool = False, log=print) -> dict:
        """``speed_only``: allow INT8 without labelled ``data`` (benchmarks of random-weight models);
        their accuracy is then unchecked and the manifest says so."""
        if NEEDS_CALIBRATION & set(names) and calib_data is None:
            raise ValueError("INT8 variants need calibration images (--calib-data, by default the train/ folder "
                             "next to --data)")
        if NEEDS_CALIBRATION & set(names) and data is None and not speed_only:
            raise ValueError("INT8 variants need --data (labelled images: the accuracy check) and calibration "
                             "images (--calib-data, by default the train/ folder next to --data)")
        ordered = (["onnx"] if NEEDS_ONNX & set(names) and "onnx" not in names else []) + names
        evalset = load_eval_set(data, self.spec, count=eval_images)
        calibration = None
        if NEEDS_CALIBRATION & set(names):
            calibration = load_calibration(calib_data, self.spec, count=calib_images)
            log(f"calibration: {len(calibration)} images of {calib_data}")
        with torch.no_grad():
            ref_logits = self.model(normalize(evalset.crops, mean=self.spec.mean, std=self.spec.std))
        ref_acc = (ref_logits.argmax(1) == evalset.labels).float().mean().item() if evalset.labels is not None else None
        write_index_to_name(os.path.join(self.out, INDEX_FILE), self.spec.class_names)
        entries, rows, refused = {}, {}, {}
        for name in ordered:
            variant = VARIANTS[name]
            path = self.write(variant, calibration)
            backend = load_backend(path)
            output, ms = run_backend(backend, self.graph_input(variant, evalset))
            result = compare(output, self.reference(variant, evalset), kind=variant.output, labels=evalset.labels,
                             k=min(5, self.spec.num_classes))
            result["ms_per_image"] = ms
            result["images"] = len(evalset.crops)
            result["runtime"] = backend.providers
            bad = problems(variant.precision, result, reference_accuracy=ref_acc, max_drop=max_drop)
            rows[name] = result
            if bad:
                refused[name] = bad
                for f in files_of(variant, self.out):
                    if os.path.exists(f):
                        os.remove(f)
                continue
            if name in names:
                entries[name] = {**variant.describe(), "files": [os.path.basename(f) for f in files_of(variant, self.out)],
                                 "input": {"name": "images", "dtype": "uint8",
                                           "shape": ["N", 3, self.input_size(variant), self.input_size(variant)]},
                                 "input_size": self.input_size(variant), "outputs": self.outputs(variant),
                                 "tta": self.graph_tta if variant.output == "probabilities" else "none",
                                 "topk": self.graph_topk if variant.output == "topk" else None, "parity": result}
            elif os.path.exists(path):  # fp32 ONNX written only as the source of other variants
                os.remove(path)
        log(f"parity against eager fp32 on {evalset.source}:")
        log(format_table(rows, reference_accuracy=ref_acc))
        manifest = self.manifest(entries, ref_acc, evalset.source)
        manifest["speed_only"] = bool(speed_only and evalset.labels is None)
        with open(os.path.join(self.out, EXPORT_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if refused:
            raise RefusedVariants(refused)
        return manifest

    def manifest(self, entries: dict, ref_acc: float | None, source: str) -> dict:
        s = self.spec
        return {"arch": s.arch, "model_kwargs": s.model_kwargs, "class_names": s.class_names,
                "input_size": s.input_size, "resize_size": s.resize_size, "mean": list(s.mean), "std": list(s.std),
                "variants": entries, "eager_accuracy": ref_acc, "verified_on": source,
                "training_metrics": self.ckpt.get("metrics", {}), "checkpoint": os.path.abspath(self.checkpoint),
                "checkpoint_sha256": sha256(self.checkpoint),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class RefusedVariants(RuntimeError):
    def __init__(self, refused: dict[str, list[str]]):
        self.refused = refused
        super().__init__("refused (not written): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in refused.items()))


def verify(export_dir: str, *, data: str | None, checkpoint: str | None = None, eval_images: int = 500,
           archive: str | None = None, log=print) -> dict[str, dict]:
    """Re-run every graph of an export folder (or of one ``.mar``) against the eager model.

    ONNX graphs run on ONNX Runtime's CPU EP and, where present, the CUDA EP; OpenVINO graphs with
    the f32 and the bf16 precision hint; TorchScript on the CPU and, where present, CUDA.
    """
    import tempfile
    import zipfile

    tmp = None
    if archive:
        tmp = tempfile.TemporaryDirectory()
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp.name)
        card = json.load(open(os.path.join(tmp.name, "model_card.json")))
        manifest = {**card, "variants": {card["variant"]: card["variant_info"]}}
        export_dir = tmp.name
    else:
        manifest = json.load(open(os.path.join(export_dir, EXPORT_MANIFEST)))
    exporter = Exporter(checkpoint or manifest["checkpoint"], tempfile.mkdtemp(prefix="verify-"),
                        graph_tta=next((v["tta"] for v in manifest["variants"].values() if v["tta"] != "none"), "flip"),
                        graph_topk=next((v["topk"] for v in manifest["variants"].values() if v["topk"]), 5))
    if exporter.spec.class_names != manifest["class_names"]:
        raise ValueError("the checkpoint's classes differ from the exported graphs'")
    evalset = load_eval_set(data, exporter.spec, count=eval_images)
    with torch.no_grad():
        ref_logits = exporter.model(normalize(evalset.crops, mean=exporter.spec.mean, std=exporter.spec.std))
    ref_acc = (ref_logits.argmax(1) == evalset.labels).float().mean().item() if evalset.labels is not None else None
    rows = {}
    cuda = torch.cuda.is_available()
    for name, info in manifest["variants"].items():
        variant = VARIANTS[name]
        path = os.path.join(export_dir, info["files"][0])
        runs = [("cpu", {})]
        if variant.runtime == "openvino":
            runs = [("f32", {"precision": "f32"}), ("bf16", {"precision": "bf16"})]
        elif cuda:
            runs.append(("cuda", {"device": torch.device("cuda")}))
        for label, kwargs in runs:
            row = f"{name} ({label})"
            try:
                backend = load_backend(path, **kwargs)
            except Exception as e:  # e.g. bf16 on a CPU without it: reported, not fatal
                rows[row] = {"error": f"not run: {e}"}
                continue
            output, ms = run_backend(backend, exporter.graph_input(variant, evalset))
            result = compare(output, exporter.reference(variant, evalset), kind=variant.output,
                             labels=evalset.labels, k=min(5, exporter.spec.num_classes))
            result.update(ms_per_image=ms, runtime=backend.providers)
            bad = problems(effective_precision(variant.precision, hint=label), result, reference_accuracy=ref_acc,
                           max_drop=DEFAULT_MAX_DROP, cuda=label == "cuda")
            result["problems"] = bad
            rows[row] = result
    log(f"verification against eager fp32 on {evalset.source}:")
    log(format_table(rows, reference_accuracy=ref_acc))
    if tmp:
        tmp.cleanup()
    return rows
