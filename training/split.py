"""Splitting a folder of labelled photos into the train/val/test tree that training reads.

``python -m training split --images photos --out data/mine`` takes ``photos/<class>/<image>`` (the
image files directly in each class folder, as ImageFolder reads them) and writes
``OUT/train/<class>/``, ``OUT/val/<class>/`` and ``OUT/test/<class>/``: the ImageFolder layout of
:mod:`training.formats`, where ``val/`` (next to ``test/``) is the validation split that chooses
``best.pt`` and ``test/`` is evaluated once, at the end.

* **Stratified:** every class is split by itself, ``--test`` and ``--val`` of its images (rounded,
  at least one each), the rest to ``train``; a class too small to give every split one image is
  refused, naming it. ``--val 0`` writes no ``val/`` (training then holds out its own
  ``--val-fraction``); ``--test`` cannot be 0 (the reader would take ``val/`` as the test split).
* **Seeded:** each class's files are shuffled by ``random.Random(f"{seed}:{class}")`` after sorting
  their names, so a split depends only on the seed and each class's file names (adding a class does
  not move the others' images); the test images are drawn first, so changing ``--val`` keeps them.
* ``--mode copy`` (default) or ``symlink`` (links to the absolute paths of the originals).
* **All or nothing:** the tree is written into a hidden ``.OUT.PID.RANDOM.tmp`` folder next to
  ``OUT`` and renamed onto ``OUT`` at the end (:func:`inference.atomic.swap_in`); an interrupted split
  leaves no ``OUT``, and the hidden folder of a killed one is removed by the next split into the same place
  (a replaced split that a killed ``--force`` had moved aside is put back first). An ``OUT`` that
  already holds a split is refused (``--force`` replaces it whole, never mixing two splits); a
  non-empty ``OUT`` holding anything else is always refused.

``OUT/split.json`` records the source, seed, fractions, mode and every file of every split; a
``class_names.json`` of the source is copied to ``OUT/``. Expected mistakes raise :class:`SplitError`
(one line; the command prints it and exits with status 2).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from inference.atomic import clean_stale as atomic_clean_stale
from inference.atomic import pid_alive, swap_in, temp_tree
from inference.image_files import OS_FILES, is_image_name, other_kinds, skipped_line

from .duplicates import find_duplicates
from .image_folder import CLASS_NAMES_FILE

SPLITS = ("train", "val", "test")
MODES = ("copy", "symlink")
DEFAULT_VAL = 0.1
DEFAULT_TEST = 0.1
DEFAULT_SEED = 0
SPLIT_RECORD = "split.json"
#: what a folder written by this module holds: only these may be replaced with ``--force``
SPLIT_ENTRIES = frozenset({*SPLITS, SPLIT_RECORD, CLASS_NAMES_FILE})


#: files an operating system's file browser leaves in any folder it shows: not the user's data
OS_DROPPINGS = frozenset({".DS_Store", *OS_FILES})


def _dropping(name: str) -> bool:
    return name in OS_DROPPINGS or name.startswith("._")  # ._NAME: macOS AppleDouble metadata


class SplitError(ValueError):
    """A user mistake: the message is one line saying what to do."""


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
        return True
    return False


def _is_image(path: Path) -> bool:
    return path.is_file() and is_image_name(path.name)


def scan_classes(images: str | os.PathLike) -> dict[str, list[str]]:
    """``{class folder: sorted image file names}`` of ``images/<class>/<image>`` (hidden entries skipped)."""
    root = Path(images)
    if not root.is_dir():
        raise SplitError(f"--images {images}: folder not found (expected IMAGES/<class>/<image files>)")
    if (root / SPLIT_RECORD).is_file() and (root / "train").is_dir():
        raise SplitError(f"--images {images} is already a split (it has {SPLIT_RECORD}): train on it directly, "
                         f"python -m training train --data {images} ..., or split the original photos again")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if _is_image(p)]
    if not folders:
        raise SplitError(f"--images {images} has no class folders: put each class's images in IMAGES/<class>/"
                         + (f" ({len(loose)} images lie directly in it)" if loose else ""))
    if loose:
        print(f"warning: {len(loose)} image files directly in {images} are in no class folder and are left out",
              file=sys.stderr)
    if bad := [p.name for p in folders if _not_utf8(p.name)]:
        raise SplitError(f"class folder {bad[0]!r} of {images}: its name is not valid UTF-8 text (a zip unpacked "
                         "with another encoding?): rename it")
    classes, skipped = {}, Counter()
    for folder in folders:
        classes[folder.name] = sorted(p.name for p in folder.iterdir() if _is_image(p))
        skipped.update(other_kinds(p.name for p in folder.iterdir() if p.is_file()))
        nested = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if nested:
            print(f"warning: sub-folders of {folder} are left out (only its own image files are read): "
                  f"{', '.join(sorted(nested)[:3])}{', ...' if len(nested) > 3 else ''}", file=sys.stderr)
    if skipped:  # e.g. an iPhone's .heic photos: a class of only those would read "has 0 images"
        print(skipped_line(skipped), file=sys.stderr)
    return classes


def _round(x: float) -> int:
    return int(x + 0.5)  # half up, the same on every platform


def split_counts(n: int, *, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST) -> tuple[int, int, int]:
    """``(train, val, test)`` image counts of a class of ``n``: ``test`` and ``val`` of it rounded (at
    least one each, none for a fraction of 0), the rest to train; ``train`` may come out below 1."""
    n_test = max(1, _round(n * test)) if test > 0 else 0
    n_val = max(1, _round(n * val)) if val > 0 else 0
    return n - n_val - n_test, n_val, n_test


def min_class_size(*, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST) -> int:
    """The fewest images a class needs for one in every split at these fractions."""
    n = 1
    while split_counts(n, val=val, test=test)[0] < 1:
        n += 1
    return n


def check_fractions(*, val: float, test: float) -> None:
    if not 0 < test < 1:
        raise SplitError(f"--test must be in (0, 1), not {test}: training evaluates a test split once, at the end "
                         "(use --val 0 to let training hold out its own validation images instead)")
    if not 0 <= val < 1:
        raise SplitError(f"--val must be in [0, 1), not {val}")
    if val + test >= 1:
        raise SplitError(f"--val {val} + --test {test} leave no training images: their sum must be below 1")


def plan_split(classes: dict[str, list[str]], *, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST,
               seed: int = DEFAULT_SEED, groups: dict[str, list[list[str]]] | None = None
               ) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: file names}}`` for :data:`SPLITS` (``val`` left out when ``val`` is 0).

    ``groups``: each class's files that must land in one split (identical photos,
    :func:`training.duplicates.find_duplicates`); a group counts as one photo. Without duplicates the plan is
    the same as without ``groups``. Refuses (:class:`SplitError`, one line naming every such class) a class
    with too few distinct images to give every split at least one.
    """
    check_fractions(val=val, test=test)
    if len(classes) < 2:
        raise SplitError(f"{len(classes)} class folder ({', '.join(map(repr, classes))}): a classifier needs at least "
                         "2 classes, each in a folder of its own")
    need = min_class_size(val=val, test=test)
    groups = groups or {c: [[f] for f in sorted(files)] for c, files in classes.items()}
    small = {c: (len(classes[c]), len(g)) for c, g in groups.items() if len(g) < need}
    if small:
        listed = ", ".join(f"{c!r} has {n}" + (f" ({d} distinct)" if d < n else "") for c, (n, d) in sorted(small.items()))
        raise SplitError(f"too few images to give train, {'val and ' if val > 0 else ''}test one each (at least "
                         f"{need} per class with --val {val} --test {test}): {listed}; add images or drop the class")
    plan: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS if s != "val" or val > 0}
    for cls in sorted(classes):
        order = sorted(groups[cls])  # one file each, unless identical ones: the same order as the files'
        random.Random(f"{seed}:{cls}").shuffle(order)  # str seeds hash with SHA-512: stable everywhere
        n_train, n_val, n_test = split_counts(len(order), val=val, test=test)
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for split in plan:
            plan[split][cls] = sorted(f for group in parts[split] for f in group)
    return plan


def summary_table(plan: dict[str, dict[str, list[str]]]) -> str:
    """Counts per class and split, with a total row and column, as aligned text."""
    splits = list(plan)
    classes = sorted(plan["train"])
    rows = [[c, *(len(plan[s][c]) for s in splits), sum(len(plan[s][c]) for s in splits)] for c in classes]
    rows.append(["total", *(sum(r[1 + i] for r in rows) for i in range(len(splits))), sum(r[-1] for r in rows)])
    header = ["class", *splits, "total"]
    width = max(len(str(r[0])) for r in [header, *rows])
    nums = [max(len(str(x)) for x in col) for col in zip(*[header[1:], *[r[1:] for r in rows]])]
    lines = [" ".join([str(r[0]).ljust(width), *(str(x).rjust(w) for x, w in zip(r[1:], nums))])
             for r in [header, *rows]]
    return "\n".join(lines)


def clean_stale(out: Path) -> None:
    """Remove what a killed split into ``out`` left next to it: its hidden temporary tree, and put back
    a replaced split it had moved aside before its new one was in place (:func:`inference.atomic.clean_stale`;
    and the ``.OUT.split-PID-*`` / ``.OUT.old-PID-*/split`` folders of the versions before 2026-12-06)."""
    atomic_clean_stale(folder=out.parent, name=out.name)
    if not out.parent.is_dir():
        return
    # exactly tempfile.mkdtemp's names: a user's own ".mine.old-2024-05" folder is no PID 2024's temporary
    legacy = re.compile(re.escape(out.name) + r"\.(split|old)-(\d+)-[a-z0-9_]{8}")
    for entry in sorted(out.parent.iterdir()):
        m = legacy.fullmatch(entry.name[1:]) if entry.name.startswith(".") else None
        if not m or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and (entry / "split").is_dir() and not os.path.lexists(out):
            os.rename(entry / "split", out)  # killed between moving the old split aside and renaming the new one in
        shutil.rmtree(entry, ignore_errors=True)


def _real_out(out: Path) -> Path:
    """``out``, or the folder it links to (``data/mine`` -> a larger disk): the split is written there, in place
    of that folder, and the link stays (renaming onto the link itself fails: "is a directory")."""
    return out.resolve() if out.is_symlink() and out.is_dir() else out


def _check_out(out: Path, images: Path, *, force: bool) -> bool:
    """Whether ``out`` holds a split that ``--force`` replaces; refuse any other non-empty ``out``."""
    src, dst = images.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise SplitError(f"--out {out} and --images {images} overlap: write the split to a folder of its own")
    if not os.path.lexists(out):
        return False
    if not out.is_dir():
        raise SplitError(f"--out {out} exists and is not a folder")
    found = {p.name for p in out.iterdir()}
    entries = {name for name in found if not _dropping(name)}
    if not entries:  # empty, or only a file browser's .DS_Store: replaced with the folder
        return bool(found)
    if not entries & SPLIT_ENTRIES:
        raise SplitError(f"--out {out} is not empty and holds no split: choose a new folder")
    if SPLIT_RECORD not in entries:  # train/ val/ test/ of a data set of the user's own: never replaced
        raise SplitError(f"--out {out} holds {', '.join(sorted(entries & SPLIT_ENTRIES))} but no {SPLIT_RECORD}: it "
                         "is no split written by `python -m training split` (a data set of your own?), and even "
                         "--force leaves it alone: choose a new folder")
    if not force:
        raise SplitError(f"--out {out} already holds a split: pass --force to replace it whole, or choose a new "
                         "folder (two splits are never mixed)")
    others = sorted(entries - SPLIT_ENTRIES)
    if others:
        raise SplitError(f"--out {out} holds more than a split ({', '.join(others[:3])}): --force replaces only a "
                         "folder written by `python -m training split`; choose a new folder")
    return True


def write_split(plan: dict[str, dict[str, list[str]]], *, images: str | os.PathLike, out: str | os.PathLike,
                mode: str = "copy", force: bool = False, record: dict | None = None) -> Path:
    """Write ``plan`` as ``out/<split>/<class>/<file>`` (copies or symlinks of ``images/<class>/<file>``)
    through a hidden temporary folder renamed onto ``out``; return ``out``."""
    if mode not in MODES:
        raise SplitError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    images, out = Path(images), _real_out(Path(out))
    clean_stale(out)
    _check_out(out, images, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_tree(out))
    try:
        for split, per_class in plan.items():
            for cls, files in per_class.items():
                folder = tmp / split / cls
                folder.mkdir(parents=True)
                for name in files:
                    src = images / cls / name
                    if mode == "symlink":
                        os.symlink(src.resolve(), folder / name)
                    else:
                        shutil.copy2(src, folder / name)
        if (images / CLASS_NAMES_FILE).is_file():
            shutil.copy2(images / CLASS_NAMES_FILE, tmp / CLASS_NAMES_FILE)
        (tmp / SPLIT_RECORD).write_text(json.dumps({**(record or {}), "mode": mode, "files": plan}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp=tmp, dst=out)  # the old split (if --force replaces one) aside, the new one in, the old one dropped
    return out


def split_images(*, images: str | os.PathLike, out: str | os.PathLike, val: float = DEFAULT_VAL,
                 test: float = DEFAULT_TEST, seed: int = DEFAULT_SEED, mode: str = "copy",
                 force: bool = False) -> dict[str, dict[str, list[str]]]:
    """Plan and write the split of ``images`` into ``out``; return the plan (``{split: {class: files}}``)."""
    if mode not in MODES:
        raise SplitError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    check_fractions(val=val, test=test)
    out = _real_out(Path(out))
    classes = scan_classes(images)
    plan_split(classes, val=val, test=test, seed=seed)  # its refusals first, before any file is read
    groups, across = find_duplicates(images, classes)
    _warn_duplicates(groups, across)
    plan = plan_split(classes, val=val, test=test, seed=seed, groups=groups)
    clean_stale(Path(out))
    _check_out(Path(out), Path(images), force=force)  # refuse before copying anything
    record = {"images": str(Path(images).resolve()), "seed": seed, "val": val, "test": test,
              "counts": {s: {c: len(f) for c, f in per_class.items()} for s, per_class in plan.items()}}
    write_split(plan, images=images, out=out, mode=mode, force=force, record=record)
    return plan


def _shown(name: str) -> str:
    """A file name as text (undecodable bytes as U+FFFD), printable on any stream."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _warn_duplicates(groups: dict[str, list[list[str]]], across: list[list[tuple[str, str]]]) -> None:
    copies = [g for gs in groups.values() for g in gs if len(g) > 1]
    if copies:
        print(f"warning: {sum(len(g) - 1 for g in copies)} photos are copies (identical bytes) of another in their "
              f"class, e.g. {' = '.join(map(_shown, copies[0][:3]))}: each set is kept in one split, so none is both "
              "trained on and tested on", file=sys.stderr)
    if across:
        shown = " = ".join(f"{c}/{_shown(n)}" for c, n in across[0][:3])
        print(f"warning: {len(across)} photos are filed under more than one class (identical bytes), e.g. {shown}: "
              "one photo cannot have two labels; remove the wrong copies and split again", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of labelled images: IMAGES/<class>/<image files>")
    parser.add_argument("--out", required=True, help="output folder: OUT/train/<class>/, OUT/val/<class>/, "
                        "OUT/test/<class>/ (what `train --data OUT` reads) and OUT/split.json")
    parser.add_argument("--val", type=float, default=DEFAULT_VAL, help="fraction of each class for the validation "
                        "split that chooses best.pt; 0: no val/ (training holds out --val-fraction itself) "
                        "(default: %(default)s)")
    parser.add_argument("--test", type=float, default=DEFAULT_TEST, help="fraction of each class for the test split, "
                        "evaluated once after training (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed of the split (default: %(default)s)")
    parser.add_argument("--mode", default="copy", choices=MODES, help="copy the images, or symlink to the originals "
                        "(default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an OUT that already holds a split "
                        "(written by this command); never mixes two splits")


def run(args: argparse.Namespace) -> int:
    """The ``split`` command: write the split and print the table of counts. A mistake (:class:`SplitError`, a
    missing or unreadable path, a full disk) is one line and status 2 through ``inference.cli.run``; any other
    error is a bug and keeps its traceback."""
    plan = split_images(images=args.images, out=args.out, val=args.val, test=args.test, seed=args.seed,
                        mode=args.mode, force=args.force)
    print(summary_table(plan))
    print(f"split of {args.images} written to {args.out} ({args.mode}, seed {args.seed}); next: "
          f"python -m training train --data {args.out} --preset photo --out runs/NAME")
    return 0
