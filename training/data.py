"""Data sets: ImageFolder trees, iNaturalist-style JSON, CIFAR-10/100 pickles, and the embedded Fashion-MNIST.

Every data set returns ``(uint8 (C, H, W) tensor, int label)`` and has ``classes`` (names, in label
order), ``paths`` (one string per image) and ``labels`` (LongTensor) attributes, plus the same
``transform``/``cache_transform`` semantics (see :class:`ImageFolderDataset`).

* ImageFolder (``DIR/<class>/<image>``): class order is the sorted folder names (torchvision's
  ImageFolder convention). A folder name cannot hold ``/``; an optional ``DIR/class_names.json``
  (``{"folder": "display name"}``) gives the names shown to people, e.g. ``"T-shirt_top" -> "T-shirt/top"``.
* iNaturalist 2021 style JSON (:class:`InatDataset`): ``images``/``annotations``/``categories``;
  class order is the categories sorted by id.
* CIFAR-10/100 python pickles (:class:`CifarDataset`), held in memory.

:func:`build_datasets` picks the format of a data folder (:func:`detect_format`) and returns the
train and test sets.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler
from tqdm import tqdm

from .images import read_image_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_NAMES_FILE = "class_names.json"

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FORMATS = ("imagefolder", "inat", "cifar")


def folder_name(class_name: str) -> str:
    return class_name.replace("/", "_")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Return ``(class_names, paths, labels)`` for an ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class name>/<images>")
    display = {}
    if (root / CLASS_NAMES_FILE).is_file():
        display = json.loads((root / CLASS_NAMES_FILE).read_text(encoding="utf-8"))
    elif (root.parent / CLASS_NAMES_FILE).is_file():
        display = json.loads((root.parent / CLASS_NAMES_FILE).read_text(encoding="utf-8"))
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in os.listdir(root / folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [str(root / folder / f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [display.get(f, f) for f in folders], paths, labels


class _LabelledImages(Dataset):
    """Shared ``__len__``/``__getitem__``/cache logic; subclasses set ``classes``, ``paths``, ``labels``.

    ``cache`` is ``None`` (decode ``paths[i]`` on every access) or a uint8 ``(N, C, H, W)`` tensor.
    """

    classes: list[str]
    paths: list[str]
    labels: torch.Tensor
    transform = None
    cache: torch.Tensor | None = None

    def _build_cache(self, cache_transform, *, progress: bool, desc: str) -> None:
        self.cache = torch.stack([cache_transform(read_image_file(p))
                                  for p in tqdm(self.paths, desc=desc, disable=not progress, mininterval=1.0)])

    def _load(self, i: int) -> torch.Tensor:
        return read_image_file(self.paths[i])

    def read(self, i: int) -> torch.Tensor:
        """Image ``i`` before ``transform``: the cached tensor, or the decoded file."""
        return self.cache[i] if self.cache is not None else self._load(i)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.read(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


class ImageFolderDataset(_LabelledImages):
    """An ImageFolder tree as uint8 tensors: ``(transform(image), label)``.

    With ``cache_transform`` every image is decoded once, passed through ``cache_transform`` (the
    deterministic part, e.g. :class:`~training.presets.EvalPreset`) and kept in memory; ``transform``
    then runs on the cached tensor each time (the random part). Without it images are decoded on
    every access, for data sets that do not fit in memory.
    """

    def __init__(self, root: str | os.PathLike, *, transform=None, cache_transform=None, progress: bool = True):
        self.root = str(root)
        self.classes, self.paths, labels = scan_image_folder(root)
        self.labels = torch.tensor(labels)
        self.transform = transform
        self.cache = None
        if cache_transform is not None:
            self._build_cache(cache_transform, progress=progress, desc=f"decode {root}")


# --------------------------------------------------------------------------- iNaturalist-style JSON

def _require(mapping, key: str, where: str):
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{where}: missing key {key!r}")
    return mapping[key]


def read_inat_json(json_path: str | os.PathLike, *, root: str | os.PathLike | None = None
                   ) -> tuple[list[str], list[str], list[int]]:
    """Return ``(class_names, paths, labels)`` of an iNaturalist-2021-style JSON file.

    ``images`` (``id``, ``file_name`` relative to ``root``, default: the JSON file's folder),
    ``annotations`` (``image_id``, ``category_id``), ``categories`` (``id``, ``name``). Classes are
    the categories sorted by id (all of them, also those without images, so train and val files
    with the same categories share label numbers); images keep the file's order.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"iNaturalist JSON file not found: {json_path}")
    root = Path(root) if root is not None else json_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root of {json_path} not found: {root}")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    name = str(json_path)
    images = _require(meta, "images", name)
    annotations = _require(meta, "annotations", name)
    categories = _require(meta, "categories", name)
    if not categories:
        raise ValueError(f"{name}: 'categories' is empty")
    cats = sorted((_require(c, "id", f"{name} categories[{i}]"), str(_require(c, "name", f"{name} categories[{i}]")))
                  for i, c in enumerate(categories))
    label_of = {}
    for label, (cid, _) in enumerate(cats):
        if cid in label_of:
            raise ValueError(f"{name}: category id {cid!r} appears twice in 'categories'")
        label_of[cid] = label
    file_of = {}
    for i, img in enumerate(images):
        iid = _require(img, "id", f"{name} images[{i}]")
        if iid in file_of:
            raise ValueError(f"{name}: image id {iid!r} appears twice in 'images'")
        file_of[iid] = _require(img, "file_name", f"{name} images[{i}]")
    category_of = {}
    for i, ann in enumerate(annotations):
        where = f"{name} annotations[{i}]"
        iid, cid = _require(ann, "image_id", where), _require(ann, "category_id", where)
        if cid not in label_of:
            raise ValueError(f"{where}: category_id {cid!r} is not in 'categories'")
        if iid not in file_of:
            raise ValueError(f"{where}: image_id {iid!r} is not in 'images'")
        if category_of.setdefault(iid, cid) != cid:
            raise ValueError(f"{where}: image {iid!r} is annotated with two categories "
                             f"({category_of[iid]!r} and {cid!r})")
    unlabelled = [iid for iid in file_of if iid not in category_of]
    if unlabelled:
        raise ValueError(f"{name}: {len(unlabelled)} image(s) have no annotation, e.g. image id {unlabelled[0]!r}")
    if not file_of:
        raise ValueError(f"{name}: 'images' is empty")
    paths = [str(root / f) for f in file_of.values()]
    if not os.path.isfile(paths[0]):  # cheap check that root is right; every file is checked when read
        raise FileNotFoundError(f"{name}: image file {paths[0]} not found (file_name is relative to the image "
                                f"root {root}; pass root= if the images lie elsewhere)")
    labels = [label_of[category_of[iid]] for iid in file_of]
    return [n for _, n in cats], paths, labels


class InatDataset(_LabelledImages):
    """An iNaturalist-2021-style JSON file (see :func:`read_inat_json`) as uint8 tensors.

    ``transform``/``cache_transform``/``progress`` as in :class:`ImageFolderDataset`.
    """

    def __init__(self, json_path: str | os.PathLike, *, root: str | os.PathLike | None = None, transform=None,
                 cache_transform=None, progress: bool = True):
        self.json_path = str(json_path)
        self.root = str(root if root is not None else Path(json_path).parent)
        self.classes, self.paths, labels = read_inat_json(json_path, root=root)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.transform = transform
        self.cache = None
        if cache_transform is not None:
            self._build_cache(cache_transform, progress=progress, desc=f"decode {json_path}")


# --------------------------------------------------------------------------- CIFAR-10/100 pickles

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


def _cifar_root(root: Path) -> Path:
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file() or (root / "meta").is_file():
        return root
    for sub in CIFAR_SUBFOLDERS:
        if (root / sub).is_dir():
            return root / sub
    return root


def _is_cifar_folder(root: Path) -> bool:
    root = _cifar_root(root)
    return ((root / "data_batch_1").is_file() or (root / "test_batch").is_file()
            or ((root / "train").is_file() and (root / "test").is_file()))


def _names(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class CifarDataset(_LabelledImages):
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
        self.root = str(_cifar_root(Path(root)))
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


# --------------------------------------------------------------------------- format detection

def detect_format(data: str | os.PathLike) -> str:
    """``"inat"`` (``train.json``), ``"cifar"`` (CIFAR pickles) or ``"imagefolder"`` (``train/`` folder)."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    if (root / "train.json").is_file():
        return "inat"
    if _is_cifar_folder(root):
        return "cifar"
    if (root / "train").is_dir():
        return "imagefolder"
    raise ValueError(f"cannot tell the format of {data}: looked for train.json (iNaturalist), CIFAR pickles "
                     f"(data_batch_1/test_batch or train/test files, also under {' or '.join(CIFAR_SUBFOLDERS)}) "
                     "and a train/ sub-folder (ImageFolder)")


def _first(root: Path, names: tuple[str, ...], is_ok, what: str) -> Path:
    for name in names:
        if is_ok(root / name):
            return root / name
    raise FileNotFoundError(f"{root} has none of the {what} {', '.join(names)}")


def build_datasets(data: str | os.PathLike, *, format: str = "auto", train_transform=None, eval_transform=None,
                   cache_transform=None, progress: bool = True) -> tuple[Dataset, Dataset]:
    """``(train_ds, test_ds)`` of a data folder.

    * ``imagefolder``: ``data/train`` and ``data/test`` (or ``data/val``);
    * ``inat``: ``data/train.json`` and ``data/val.json`` (or ``data/test.json``), images relative to ``data``;
    * ``cifar``: a folder of CIFAR-10/100 pickles (see :class:`CifarDataset`).

    ``train_transform`` and ``eval_transform`` run on every access of the train and test set;
    ``cache_transform`` (both sets) as in :class:`ImageFolderDataset`. Both sets must have the same classes.
    """
    root = Path(data)
    if format == "auto":
        format = detect_format(root)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    common = dict(cache_transform=cache_transform, progress=progress)
    if format == "imagefolder":
        train_dir = _first(root, ("train",), Path.is_dir, "sub-folders")
        test_dir = _first(root, ("test", "val"), Path.is_dir, "sub-folders")
        train_ds = ImageFolderDataset(train_dir, transform=train_transform, **common)
        test_ds = ImageFolderDataset(test_dir, transform=eval_transform, **common)
        train_name, test_name = train_dir, test_dir
    elif format == "inat":
        train_name = _first(root, ("train.json",), Path.is_file, "files")
        test_name = _first(root, ("val.json", "test.json"), Path.is_file, "files")
        train_ds = InatDataset(train_name, root=root, transform=train_transform, **common)
        test_ds = InatDataset(test_name, root=root, transform=eval_transform, **common)
    else:
        train_ds = CifarDataset(root, split="train", transform=train_transform, **common)
        test_ds = CifarDataset(root, split="test", transform=eval_transform, **common)
        train_name, test_name = f"{train_ds.root} (train)", f"{test_ds.root} (test)"
    if train_ds.classes != test_ds.classes:
        raise ValueError(f"the classes of {train_name} ({len(train_ds.classes)}) and {test_name} "
                         f"({len(test_ds.classes)}) differ")
    return train_ds, test_ds


# --------------------------------------------------------------------------- statistics, normalization, sampling

def dataset_stats(dataset, *, max_images: int | None = None, progress: bool = True
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of a data set's uint8 images on the 0..1 scale, streamed.

    ``dataset`` is a uint8 ``(N, C, H, W)`` tensor or a data set; of a data set, its ``cache`` (the
    deterministic, pre-augmentation pixels) is used when it has one, else ``dataset[i][0]`` (or
    ``dataset[i]`` when items are bare image tensors). ``max_images`` takes a fixed random subset (seed 0). Sums and sums of squares
    are accumulated in float64, so images may differ in size and nothing is stacked; the std is the
    unbiased one (as torch.std).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset_stats: the data set is empty")
    if max_images is not None and max_images < n:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, not {max_images}")
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images].sort().values.tolist()
    else:
        indices = list(range(n))
    cache = dataset if isinstance(dataset, torch.Tensor) else getattr(dataset, "cache", None)
    if cache is not None and cache.ndim != 4:
        raise ValueError(f"dataset_stats: expected images as (N, C, H, W), got shape {tuple(cache.shape)}")
    total = total_sq = None
    count = 0

    def add(images: torch.Tensor) -> None:  # uint8 (B, C, H, W)
        nonlocal total, total_sq, count
        x = images.to(torch.float64).transpose(0, 1).reshape(images.shape[1], -1)
        if total is None:
            total, total_sq = x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
        elif x.shape[0] != total.shape[0]:
            raise ValueError(f"dataset_stats: images with {total.shape[0]} and {x.shape[0]} channels")
        total += x.sum(1)
        total_sq += x.square().sum(1)
        count += x.shape[1]

    chunk = 256
    bar = tqdm(total=len(indices), desc="channel statistics", disable=not progress, mininterval=1.0)
    for start in range(0, len(indices), chunk):
        idx = indices[start:start + chunk]
        if cache is not None:
            add(cache[idx])
        else:
            for i in idx:
                item = dataset[i]
                image = item if isinstance(item, torch.Tensor) else item[0]
                if image.ndim != 3:
                    raise ValueError(f"dataset_stats: expected (C, H, W) images, got shape {tuple(image.shape)}")
                add(image.unsqueeze(0))
        bar.update(len(idx))
    bar.close()
    mean = total / count / 255.0
    var = (total_sq - total.square() / count) / max(1, count - 1) / 255.0 ** 2
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().tolist())


def parse_normalize(value: str, *, dataset_stats_fn) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from ``"dataset"`` (calls ``dataset_stats_fn()``), ``"imagenet"``,
    ``"M1,M2,M3,S1,S2,S3"`` or ``"M,S"`` (one value for all 3 channels); values on the 0..1 scale."""
    text = str(value).strip().lower()
    if text == "dataset":
        mean, std = dataset_stats_fn()
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if text == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    usage = "expected 'dataset', 'imagenet', 'M1,M2,M3,S1,S2,S3' or 'M,S' (0..1 scale)"
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"normalize {value!r}: {usage}") from None
    if len(numbers) == 2:
        numbers = [numbers[0]] * 3 + [numbers[1]] * 3
    if len(numbers) != 6:
        raise ValueError(f"normalize {value!r} has {len(numbers)} numbers; {usage}")
    mean, std = tuple(numbers[:3]), tuple(numbers[3:])
    if not all(0.0 <= m <= 1.0 for m in mean):
        raise ValueError(f"normalize {value!r}: means must lie in 0..1 (pixel values are scaled to 0..1, not 0..255)")
    if not all(0.0 < s <= 1.0 for s in std):
        raise ValueError(f"normalize {value!r}: stds must lie in (0, 1] (pixel values are scaled to 0..1)")
    return mean, std


def class_balanced_sampler(labels, *, num_samples: int | None = None,
                           generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """Sample with replacement, each index weighted ``1 / frequency of its class``: classes come out equally often."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_balanced_sampler: no labels")
    if int(labels.min()) < 0:
        raise ValueError("class_balanced_sampler: labels must be non-negative class indices")
    counts = torch.bincount(labels).to(torch.float64)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(weights, num_samples=len(labels) if num_samples is None else int(num_samples),
                                 replacement=True, generator=generator)


# --------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def prepare_fashion_mnist(out: str | os.PathLike, *, source: str = FASHION_MNIST_DIR, progress: bool = True) -> Path:
    """Write Fashion-MNIST as ``out/{train,test}/<class>/<index>.png`` plus ``out/class_names.json``.

    Idempotent: a split whose image count is already complete is skipped.
    """
    from PIL import Image

    out = Path(out)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} not found: install the Debian package dataset-fashion-mnist "
                                "(apt-get install -y dataset-fashion-mnist)")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(f"{source}/{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(f"{source}/{prefix}-labels-idx1-ubyte.gz", 8)
        if len(images) != len(labels):
            raise ValueError(f"{source}: {len(images)} {split} images but {len(labels)} labels")
        split_dir = out / split
        done = split_dir.is_dir() and sum(len(files) for _, _, files in os.walk(split_dir)) == len(images)
        if done:
            continue
        for name in FASHION_MNIST_CLASSES:
            (split_dir / folder_name(name)).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(images)), desc=f"fashion-mnist {split}", disable=not progress, mininterval=1.0):
            path = split_dir / folder_name(FASHION_MNIST_CLASSES[labels[i]]) / f"{i:05d}.png"
            Image.fromarray(images[i], mode="L").save(path)
    (out / CLASS_NAMES_FILE).write_text(json.dumps({folder_name(n): n for n in FASHION_MNIST_CLASSES}, indent=1))
    return out
