"""Content hashes: the SHA-256 of graph files and checkpoints, and the checks against recorded ones.

``export`` records the SHA-256 of every graph file in ``export.json`` and of the checkpoint it read;
``export archive`` packs a graph only when its bytes still have the recorded hash, and ``export verify
--archive`` compares a graph only with the checkpoint the model card names by hash. A mismatch is an
:class:`IntegrityError` (a ``ValueError``: the CLI prints it as one line).
"""
from __future__ import annotations

import hashlib
import os


class IntegrityError(ValueError):
    """A file's bytes differ from the SHA-256 recorded for it."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(*, folder: str | os.PathLike, files: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``folder/name``."""
    return {name: sha256(os.path.join(folder, name)) for name in files}


def hash_mismatches(*, folder: str | os.PathLike, expected: dict[str, str], files: list[str],
                    record: str) -> list[str]:
    """One line for each of ``files`` (names under ``folder``) whose SHA-256 is not ``expected[name]``
    (``record`` names where ``expected`` comes from, e.g. ``DIR/export.json``); empty: all match."""
    out = []
    for name in files:
        if name not in expected:
            out.append(f"{record} records no sha256 for {name} (written before graph hashes were recorded): "
                       f"export the variant again")
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            out.append(f"{path} is missing ({record} lists it)")
            continue
        actual = sha256(path)
        if actual != expected[name]:
            out.append(f"{name} has sha256 {actual} but {record} records {expected[name]}: the graph changed "
                       f"after export; export it again")
    return out


def check_files(*, folder: str | os.PathLike, expected: dict[str, str], files: list[str], record: str) -> None:
    """Raise :class:`IntegrityError` (first mismatch) unless every file has its recorded SHA-256."""
    bad = hash_mismatches(folder=folder, expected=expected, files=files, record=record)
    if bad:
        raise IntegrityError(bad[0])


def check_checkpoint(*, path: str | os.PathLike, expected: str | None, actual: str | None = None,
                     record: str) -> None:
    """Raise :class:`IntegrityError` unless the checkpoint at ``path`` (or its already computed hash
    ``actual``) has the SHA-256 ``expected`` that ``record`` (e.g. an archive's model card) names."""
    if not expected:
        raise IntegrityError(f"{record} records no checkpoint_sha256: cannot tell which checkpoint its graph "
                             f"was exported from")
    if actual is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path} (named by {record}); pass --checkpoint")
        actual = sha256(path)
    if actual != expected:
        raise IntegrityError(f"checkpoint {path} has sha256 {actual} but {record} records checkpoint_sha256 "
                             f"{expected}: it is not the checkpoint the graph was exported from (pass that one "
                             f"with --checkpoint)")
