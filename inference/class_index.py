"""The class-index file: ``index_to_name.json`` maps ``"0"``, ``"1"``, ... to class names.

TorchServe's format; written by export into every archive, read by the handler. The archive's other small
JSON file, the model card, is named here too (:data:`MODEL_CARD_FILE`), for both sides.
"""
from __future__ import annotations

import json
import os

INDEX_FILE = "index_to_name.json"
MODEL_CARD_FILE = "model_card.json"  # the export's provenance, served as the model's customizedMetadata


def write_index_to_name(path: str | os.PathLike, class_names: list[str]) -> None:
    if not class_names:
        raise ValueError("class_names is empty")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({str(i): name for i, name in enumerate(class_names)}, f, indent=1, ensure_ascii=False)


def read_index_to_name(path: str | os.PathLike) -> list[str]:
    """Return class names in index order; raise ``ValueError`` if indices are not exactly 0..N-1."""
    with open(path, encoding="utf-8") as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: expected a non-empty JSON object of index -> class name")
    try:
        indexed = {int(k): str(v) for k, v in mapping.items()}
    except ValueError as e:
        raise ValueError(f"{path}: keys must be integer indices") from e
    if sorted(indexed) != list(range(len(indexed))):
        raise ValueError(f"{path}: indices must be 0..{len(indexed) - 1} without gaps")
    return [indexed[i] for i in range(len(indexed))]
