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
    """Class names in index order. Keys are the indices ``"0"`` .. ``"N-1"`` written plainly (``"01"`` beside
    ``"1"`` is refused, not read as a second class 1); a value is a name, or TorchServe's ImageNet form
    ``["n01440764", "tench"]``, whose last item is the name (as TorchServe's ``load_label_mapping`` reads it).
    Anything else is a ``ValueError`` naming the file."""
    with open(path, encoding="utf-8") as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: expected a non-empty JSON object of index -> class name")
    if bad := [k for k in mapping if not (k.isascii() and k.isdigit() and str(int(k)) == k)]:
        raise ValueError(f"{path}: keys must be class indices 0, 1, 2, ... written plainly, not {bad[0]!r}")
    names = {int(k): v[-1] if isinstance(v, list) and v else v for k, v in mapping.items()}
    if bad := [k for k, v in names.items() if not isinstance(v, str) or not v]:
        raise ValueError(f"{path}: class {bad[0]} has no name (a non-empty string, or a list ending in one)")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: indices must be 0..{len(names) - 1} without gaps")
    return [names[i] for i in range(len(names))]


def check_graph_width(width: int, *, class_names: list[str], graph_topk: int | None = None) -> None:
    """A graph's output width against the class names (``graph_topk``: the k of an in-graph top-k): a mismatch
    would fail every batch, so the worker refuses to start with this ``ValueError``."""
    expected, what = (graph_topk, "its in-graph top-k") if graph_topk else (len(class_names), INDEX_FILE)
    if width != expected or (graph_topk and graph_topk > len(class_names)):
        raise ValueError(f"the model returns {width} scores per image but {what} says {expected} of "
                         f"{len(class_names)} classes: the graph and {INDEX_FILE} are of different models (or the "
                         "handler's graph_output is not what the graph returns); rebuild the archive with "
                         "`python -m export archive`")
