"""``export.json``: what an export folder holds, read back, and a run's entries merged into it.

One folder holds the graphs of one model: the top level says what the model is (architecture, classes,
input/resize size, mean/std: :data:`MODEL_FACTS`, which every run into the folder must share) and
what the latest run read; ``variants`` has one entry per graph, each with its files and their
SHA-256 (``sha256``), its parity numbers and its own provenance (:data:`PROVENANCE`: when, from
which checkpoint, its SHA-256 and training metrics, verified on what). A run replaces the entries of
the variants it wrote and keeps the others as they were.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

EXPORT_MANIFEST = "export.json"
MODEL_FACTS = ("arch", "model_kwargs", "class_names", "input_size", "resize_size", "mean", "std")
PROVENANCE = ("created", "checkpoint", "checkpoint_sha256", "training_metrics", "verified_on", "eager_accuracy",
              "speed_only")


def read_manifest(export_dir: str | os.PathLike) -> dict | None:
    """The folder's ``export.json``, or ``None`` where there is none."""
    path = Path(export_dir) / EXPORT_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to export into {export_dir}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("variants"), dict):
        raise ValueError(f"{path} is not an export manifest (no 'variants'); move it away to export into "
                         f"{export_dir}")
    return manifest


def load_manifest(export_dir: str | os.PathLike) -> dict:
    manifest = read_manifest(export_dir)
    if manifest is None:
        raise FileNotFoundError(f"{Path(export_dir) / EXPORT_MANIFEST} not found: run `python -m export "
                                f"--checkpoint ... --out {export_dir}` first")
    return manifest


def check_same_model(*, earlier: dict | None, facts: dict, export_dir: str | os.PathLike) -> None:
    """Refuse to add graphs of another model to a folder (the classes and sizes are shared by all)."""
    if earlier is None:
        return
    for key in MODEL_FACTS:
        if key in earlier and _plain(earlier[key]) != _plain(facts[key]):
            raise ValueError(f"{Path(export_dir) / EXPORT_MANIFEST} describes another model ({key} "
                             f"{earlier[key]!r} there, {facts[key]!r} in this checkpoint): export into a new "
                             f"folder, or move the old one away")


def check_foreign_files(*, earlier: dict | None, files: list[str], shared: tuple[str, ...],
                        export_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Refuse to write over a file of ``export_dir`` that no export into it wrote (one that ``export.json``
    does not list): a user's own ``model.onnx``, or the checkpoint being exported when it is named like a
    graph (``--checkpoint models/model.pt --out models`` replaced the checkpoint with the TorchScript graph).
    ``shared``: the files every export writes (``export.json``, ``index_to_name.json``): ours where an earlier
    ``export.json`` is."""
    ours = {f for entry in (earlier or {}).get("variants", {}).values() for f in entry.get("files", [])}
    if earlier is not None:
        ours |= set(shared)
    checkpoint = os.path.realpath(checkpoint)
    for name in [*files, *shared]:
        path = Path(export_dir) / name
        if name in ours or not os.path.lexists(path):
            continue
        what = "the checkpoint being exported" if os.path.realpath(path) == checkpoint else "a file no export wrote"
        why = (f"{EXPORT_MANIFEST} there does not list it; an older export may have left it" if earlier is not None
               else f"there is no {EXPORT_MANIFEST}")
        raise ValueError(f"{path} is {what} ({why}) and this export would write over it: export into a new folder, "
                         "or move that file away")


def _plain(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as the JSON file has them


def legacy_provenance(earlier: dict) -> dict:
    """What an entry written before entries carried their own provenance inherits from its file."""
    return {k: earlier[k] for k in PROVENANCE if k in earlier}


def merge(*, earlier: dict | None, run: dict, entries: dict[str, dict]) -> dict:
    """``run`` (this run's top level) with ``variants``: the earlier entries, those of ``entries``
    replaced (in place) or added (at the end)."""
    variants = {}
    if earlier is not None:
        inherited = legacy_provenance(earlier)
        variants = {name: {**inherited, **entry} for name, entry in earlier["variants"].items()}
    variants.update(entries)
    return {**_plain(run), "variants": variants}
