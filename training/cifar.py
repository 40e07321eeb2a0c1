"""The CIFAR-10/100 python-pickle format, read with a restricted unpickler.

pickle runs whatever callable a file names; :func:`load_cifar_pickle` unpickles with an allow-list
(plain containers, strings, bytes, numbers and numpy arrays), so a tampered file cannot execute
code. :class:`CifarDataset` reads the official archives' layout and holds the images in memory.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .datasets import LabelledImages
from .progress import tqdm

CIFAR10_TRAIN = re.compile(r"data_batch_(\d+)")
CIFAR_SUBFOLDERS = ("cifar-10-batches-py", "cifar-100-python")  # what the official archives extract to


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    a = np.zeros(1, dtype=np.uint8)
    reconstruct = np.ndarray.__reduce__(a)[0]       # numpy(._)core.multiarray._reconstruct
    frombuffer = np.ndarray.__reduce_ex__(a, 5)[0]  # numpy(._)core.numeric._frombuffer (protocol 5)
    import _codecs
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,   # numpy 1.x pickles (the official files)
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # numpy 2.x pickles
        ("numpy.core.numeric", "_frombuffer"): frombuffer,
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings, bytes, numbers and numpy arrays; refuses every other global.

    pickle runs whatever callable a file names, so a CIFAR pickle must come from a trusted source (the
    official archive); this allow-list additionally keeps a tampered file from executing code.
    """

    _allowed = None

    def find_class(self, module: str, name: str):
        if _ArrayOnlyUnpickler._allowed is None:
            _ArrayOnlyUnpickler._allowed = _numpy_reconstructors()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: CIFAR pickles may only hold "
                                         "dicts, lists, strings, bytes, numbers and numpy arrays") from None


def load_cifar_pickle(path: str | os.PathLike) -> dict:
    """Load one CIFAR python pickle as a dict with ``str`` keys (restricted unpickling, see above)."""
    # encoding="bytes": the official files were written by Python 2; their str keys/values come back as bytes.
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # UnpicklingError (refused or corrupt), EOFError, numpy's errors, ...
        raise ValueError(f"{path}: not a CIFAR python pickle: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_root(root: Path) -> Path:
    """The folder holding the pickles: ``root`` itself or its extracted archive sub-folder."""
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file() or (root / "meta").is_file():
        return root
    for sub in CIFAR_SUBFOLDERS:
        if (root / sub).is_dir():
            return root / sub
    return root


def is_cifar_folder(root: Path) -> bool:
    """Whether ``root`` (or its archive sub-folder) holds CIFAR-10 or CIFAR-100 pickles."""
    root = cifar_root(root)
    return ((root / "data_batch_1").is_file() or (root / "test_batch").is_file()
            or ((root / "train").is_file() and (root / "test").is_file()))


def _names(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class CifarDataset(LabelledImages):
    """CIFAR-10 or CIFAR-100 python pickles, held in memory as a uint8 ``(N, 3, 32, 32)`` tensor (``cache``).

    CIFAR-10: ``data_batch_1`` ... ``data_batch_5`` (train), ``test_batch``, ``batches.meta``
    (``label_names``). CIFAR-100: ``train``, ``test``, ``meta`` (``fine_label_names``; labels are
    ``fine_labels``). ``root`` may also be the folder holding the extracted ``cifar-10-batches-py``
    or ``cifar-100-python``. ``paths`` are ``"<file>#<index in file>"``.

    The in-memory array is the cache: ``cache_transform``, when given, is applied once to every image
    at load time; ``transform`` runs on each access.

    The files are unpickled with an allow-list (only numpy array reconstruction), but they should
    still come from a trusted source: pickle is a code-execution format.
    """

    def __init__(self, root: str | os.PathLike, *, split: str = "train", transform=None, cache_transform=None,
                 progress: bool = True):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.root = str(cifar_root(Path(root)))
        folder = Path(self.root)
        if not folder.is_dir():
            raise FileNotFoundError(f"CIFAR folder not found: {root}")
        if (folder / "data_batch_1").is_file() or (folder / "batches.meta").is_file():  # CIFAR-10
            if split == "train":
                files = sorted((f for f in os.listdir(folder) if CIFAR10_TRAIN.fullmatch(f)),
                               key=lambda f: int(CIFAR10_TRAIN.fullmatch(f).group(1)))
            else:
                files = ["test_batch"]
            meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
        elif (folder / "train").is_file() or (folder / "test").is_file() or (folder / "meta").is_file():  # CIFAR-100
            files = [split]
            meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
        else:
            raise FileNotFoundError(f"{root} holds no CIFAR pickles: looked for data_batch_1..5 + test_batch + "
                                    f"batches.meta (CIFAR-10) or train + test + meta (CIFAR-100), also in "
                                    f"the sub-folders {' and '.join(CIFAR_SUBFOLDERS)}")
        missing = [f for f in [*(files or ["data_batch_1"]), meta_file] if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing CIFAR file(s) {', '.join(missing)}")
        meta = load_cifar_pickle(folder / meta_file)
        if names_key not in meta:
            raise ValueError(f"{folder / meta_file}: missing key {names_key!r}")
        self.classes = _names(meta[names_key])
        arrays, labels, self.paths = [], [], []
        for f in tqdm(files, desc=f"load {folder}", disable=not progress):
            batch = load_cifar_pickle(folder / f)
            for key in ("data", labels_key):
                if key not in batch:
                    raise ValueError(f"{folder / f}: missing key {key!r}")
            data = np.asarray(batch["data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{folder / f}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
            if len(batch[labels_key]) != len(data):
                raise ValueError(f"{folder / f}: {len(data)} images but {len(batch[labels_key])} labels")
            arrays.append(data)
            labels += [int(y) for y in batch[labels_key]]
            self.paths += [f"{f}#{i}" for i in range(len(data))]
        self.labels = torch.tensor(labels, dtype=torch.long)
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classes):
            raise ValueError(f"{folder}: labels must lie in 0..{len(self.classes) - 1}")
        images = torch.from_numpy(np.concatenate(arrays)).view(-1, 3, 32, 32)  # concatenate copies: writable
        if cache_transform is not None:
            images = torch.stack([cache_transform(img) for img in
                                  tqdm(images, desc=f"transform {folder}", disable=not progress, mininterval=1.0)])
        self.cache = images
        self.transform = transform
