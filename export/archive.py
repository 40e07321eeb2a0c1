"""Build self-contained ``.mar`` archives with ``torch-model-archiver``.

An archive holds the exported graph, the handler and its helper modules (copied flat: the handler
imports them as top-level modules inside TorchServe's model directory), ``index_to_name.json`` and
``model-config.yaml`` (batching, workers and handler settings).
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

REPO = Path(__file__).resolve().parent.parent
HANDLER = REPO / "handlers" / "classifier_handler.py"
# The handler's helper modules: each depends on torch/torchvision/Pillow (and onnxruntime) only.
HELPERS = [REPO / "handlers" / "backends.py", REPO / "handlers" / "pipeline.py", REPO / "training" / "presets.py",
           REPO / "training" / "images.py", REPO / "training" / "class_index.py", REPO / "training" / "tta.py"]
EXPORT_MANIFEST = "export.json"
FORMAT_FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}


def model_config(*, batch_size: int = 8, max_batch_delay_ms: int = 10, workers: int = 1, response_timeout_s: int = 60,
                 topk: int = 5, tta: str = "flip", max_pixels: int = 40_000_000, threads: int = 0,
                 input_size: int, resize_size: int) -> dict:
    """The archive's ``model-config.yaml``: TorchServe's keys at top level, the handler's under ``handler``."""
    return {
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": response_timeout_s,
        "handler": {"topk": topk, "tta": tta, "max_pixels": max_pixels, "threads": threads,
                    "input_size": input_size, "resize_size": resize_size},
    }


def build_archive(export_dir: str | os.PathLike, *, fmt: str = "onnx", name: str, version: str = "1.0",
                  model_store: str | os.PathLike = "model_store", archive_format: str = "default",
                  **config) -> Path:
    """Write ``model_store/NAME.mar`` (or ``model_store/NAME/`` for ``no-archive``) and return its path."""
    export_dir = Path(export_dir)
    manifest_path = export_dir / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run `python -m export --checkpoint ... --out {export_dir}` first")
    manifest = json.loads(manifest_path.read_text())
    if fmt not in manifest["files"]:
        raise ValueError(f"{export_dir} holds no {fmt} graph (it has: {', '.join(manifest['files'])})")
    model_store = Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    cfg = model_config(input_size=manifest["input_size"], resize_size=manifest["resize_size"], **config)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "model-config.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        card_path = Path(tmp) / "model_card.json"
        card_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"} |
                                        {"format": fmt, "name": name, "version": version}, indent=1))
        extra = [str(p) for p in HELPERS] + [str(export_dir / INDEX_FILE), str(card_path)]
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", version,
               "--serialized-file", str(export_dir / manifest["files"][fmt]), "--handler", str(HANDLER),
               "--extra-files", ",".join(extra), "--config-file", str(config_path), "--export-path", str(model_store),
               "--archive-format", archive_format, "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return model_store / (name if archive_format == "no-archive" else f"{name}.mar")


def clean_stale(model_store: Path, name: str) -> None:
    for p in (model_store / f"{name}.mar", model_store / name):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
