"""Build self-contained ``.mar`` archives with ``torch-model-archiver``.

An archive holds the exported graph (``.xml`` + ``.bin`` for OpenVINO), the handler, the inference
core as a package directory (``inference/``: the handler imports it exactly as in the repository),
``index_to_name.json``, ``model_card.json`` and ``model-config.yaml`` (TorchServe's batching and
worker keys, and the handler's section), written from :mod:`inference.settings`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import yaml

import inference
from inference.class_index import INDEX_FILE
from inference.settings import HandlerSettings, WorkerSettings

from .exporter import EXPORT_MANIFEST

REPO = Path(__file__).resolve().parent.parent
HANDLER = REPO / "handlers" / "classifier_handler.py"
CORE = Path(inference.__file__).resolve().parent  # the inference package, carried whole


def split_options(options: dict) -> tuple[WorkerSettings, dict]:
    """``options`` (field names of both settings classes) -> (WorkerSettings, the handler's options)."""
    worker_names = {f.name for f in fields(WorkerSettings)}
    handler_names = {f.name for f in fields(HandlerSettings)}
    unknown = sorted(set(options) - worker_names - handler_names)
    if unknown:
        raise TypeError(f"unknown archive option(s): {', '.join(unknown)}")
    return (WorkerSettings(**{k: v for k, v in options.items() if k in worker_names}),
            {k: v for k, v in options.items() if k in handler_names})


def model_config(**options) -> dict:
    """The archive's ``model-config.yaml``: TorchServe's keys at top level, the handler's under ``handler``.

    ``options`` are field names of :class:`WorkerSettings` and :class:`HandlerSettings` (the graph's
    facts ``input_size`` etc. included); each is validated there.
    """
    workers, handler = split_options(options)
    return {**workers.to_config(), "handler": HandlerSettings(**handler).to_config()}


def stage_core(dest: Path) -> Path:
    """Copy the inference package into ``dest/inference`` (no caches) and return ``dest``.

    torch-model-archiver copies the *contents* of a folder named in ``--extra-files`` into the
    archive's root, so the folder handed to it is ``dest``, which holds the package folder itself.
    """
    shutil.copytree(CORE, dest / CORE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def load_manifest(export_dir: str | os.PathLike) -> dict:
    path = Path(export_dir) / EXPORT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m export --checkpoint ... --out {export_dir}` first")
    return json.loads(path.read_text())


def build_archive(export_dir: str | os.PathLike, *, variant: str = "onnx", name: str, version: str = "1.0",
                  file_name: str | None = None, model_store: str | os.PathLike = "model_store",
                  archive_format: str = "default", **config) -> Path:
    """Write ``model_store/FILE_NAME.mar`` (or a folder for ``no-archive``) and return its path.

    ``config``: field names of :class:`WorkerSettings` and :class:`HandlerSettings` (defaults there).
    """
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    if variant not in manifest["variants"]:
        raise ValueError(f"{export_dir} holds no {variant} graph (it has: {', '.join(manifest['variants'])})")
    info = manifest["variants"][variant]
    model_store = Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    options = dict(config)
    if info["output"] != "logits":
        options["tta"] = "none"  # the graph does its own TTA/top-k
    if info["topk"]:
        options["topk"] = min(options.get("topk", HandlerSettings.topk), info["topk"])
    cfg = model_config(**options, input_size=info["input_size"], resize_size=manifest["resize_size"],
                       graph_output=info["output"], graph_tta=info["tta"], graph_topk=info["topk"],
                       precision=info["precision"])
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
        core = stage_core(Path(tmp) / "core")
        extra = [str(core), str(export_dir / INDEX_FILE), str(card_path)] + [str(p) for p in rest]
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
