"""Build self-contained ``.mar`` archives with ``torch-model-archiver``.

An archive holds the exported graph (``.xml`` + ``.bin`` for OpenVINO), the handler and its helper
modules (copied flat: the handler imports them as top-level modules inside TorchServe's model
directory), ``index_to_name.json``, ``model_card.json`` and ``model-config.yaml`` (batching, workers
and handler settings).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from training.class_index import INDEX_FILE

from .exporter import EXPORT_MANIFEST

REPO = Path(__file__).resolve().parent.parent
HANDLER = REPO / "handlers" / "classifier_handler.py"
# The handler's helper modules: each depends on torch/torchvision/Pillow (and onnxruntime/openvino) only.
HELPERS = [REPO / "handlers" / "backends.py", REPO / "handlers" / "pipeline.py", REPO / "training" / "presets.py",
           REPO / "training" / "images.py", REPO / "training" / "class_index.py", REPO / "training" / "tta.py"]


def model_config(*, batch_size: int = 8, max_batch_delay_ms: int = 10, workers: int = 1, response_timeout_s: int = 60,
                 topk: int = 5, tta: str = "flip", tta_scales: list[float] | None = None,
                 tta_aggregate: str = "softmax", adaptive_tta: bool = False, adaptive_metric: str = "confidence",
                 adaptive_threshold: float = 0.9, max_pixels: int = 40_000_000, max_images_per_request: int = 32,
                 max_forward_batch: int = 256, threads: int = 0, input_size: int, resize_size: int,
                 graph_output: str = "logits", graph_tta: str = "none", graph_topk: int | None = None,
                 precision: str = "fp32", openvino_precision: str = "auto") -> dict:
    """The archive's ``model-config.yaml``: TorchServe's keys at top level, the handler's under ``handler``."""
    handler = {"topk": topk, "tta": "none" if graph_output != "logits" else tta, "tta_aggregate": tta_aggregate,
               "adaptive_tta": adaptive_tta, "adaptive_metric": adaptive_metric,
               "adaptive_threshold": adaptive_threshold, "max_pixels": max_pixels,
               "max_images_per_request": max_images_per_request, "max_forward_batch": max_forward_batch,
               "threads": threads, "input_size": input_size, "resize_size": resize_size,
               "graph_output": graph_output, "graph_tta": graph_tta, "precision": precision,
               "openvino_precision": openvino_precision}
    if tta_scales:
        handler["tta_scales"] = [float(s) for s in tta_scales]
    if graph_topk:
        handler["graph_topk"] = graph_topk
        handler["topk"] = min(topk, graph_topk)
    return {"minWorkers": workers, "maxWorkers": workers, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
            "responseTimeout": response_timeout_s, "handler": handler}


def load_manifest(export_dir: str | os.PathLike) -> dict:
    path = Path(export_dir) / EXPORT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m export --checkpoint ... --out {export_dir}` first")
    return json.loads(path.read_text())


def build_archive(export_dir: str | os.PathLike, *, variant: str = "onnx", name: str, version: str = "1.0",
                  file_name: str | None = None, model_store: str | os.PathLike = "model_store",
                  archive_format: str = "default", **config) -> Path:
    """Write ``model_store/FILE_NAME.mar`` (or a folder for ``no-archive``) and return its path."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    if variant not in manifest["variants"]:
        raise ValueError(f"{export_dir} holds no {variant} graph (it has: {', '.join(manifest['variants'])})")
    info = manifest["variants"][variant]
    model_store = Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    cfg = model_config(input_size=info["input_size"], resize_size=manifest["resize_size"], graph_output=info["output"],
                       graph_tta=info["tta"], graph_topk=info["topk"], precision=info["precision"], **config)
    file_name = file_name or name
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        card = {k: v for k, v in manifest.items() if k != "variants"}
        card.update(name=name, version=version, variant=variant, variant_info=info, runtime=info["runtime"],
                    precision=info["precision"], tta=info["tta"] if info["tta"] != "none" else cfg["handler"]["tta"],
                    parity=info["parity"], handler=cfg["handler"])
        card_path = Path(tmp) / "model_card.json"
        card_path.write_text(json.dumps(card, indent=1))
        graph, *rest = [export_dir / f for f in info["files"]]
        extra = [str(p) for p in HELPERS] + [str(export_dir / INDEX_FILE), str(card_path)] + [str(p) for p in rest]
        export_path = Path(tmp) / "out"
        export_path.mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", version,
               "--serialized-file", str(graph), "--handler", str(HANDLER), "--extra-files", ",".join(extra),
               "--config-file", str(config_path), "--export-path", str(export_path),
               "--archive-format", archive_format, "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        built = export_path / (name if archive_format == "no-archive" else f"{name}.mar")
        target = model_store / (file_name if archive_format == "no-archive" else f"{file_name}.mar")
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(built, target)  # tmp may be another file system: move, not rename
    return target


def build_archives(export_dir: str | os.PathLike, *, variants: str, name: str, file_name: str | None = None,
                   **kwargs) -> list[Path]:
    """One archive per variant; with several, model and file names get a ``_<variant>`` suffix."""
    manifest = load_manifest(export_dir)
    names = list(manifest["variants"]) if variants == "all" else [v.strip() for v in variants.split(",") if v.strip()]
    if len(names) == 1:
        return [build_archive(export_dir, variant=names[0], name=name, file_name=file_name, **kwargs)]
    return [build_archive(export_dir, variant=v, name=f"{name}_{v.replace('-', '_')}", **kwargs) for v in names]
