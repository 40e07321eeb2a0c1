"""The labelled-image data-set interface that every format shares, and the lazy data set.

Every data set (:mod:`training.image_folder`, :mod:`training.inat`, :mod:`training.cifar`; picked by
:func:`training.formats.build_datasets`) returns ``(uint8 (C, H, W) tensor, int label)`` and has
``classes`` (names, in label order), ``paths`` (one string per image) and ``labels`` (LongTensor)
attributes, plus the same ``transform``/``cache_transform`` semantics (see
:class:`~training.image_folder.ImageFolderDataset`). :class:`LazyDataset` computes its images on
access (channel statistics of the un-augmented training images, unlabelled folders).

Training-time helpers: :func:`stratified_split` and :class:`ImageSubset` (a validation split carved
from the training images), and :class:`TrainingImages`, the training loader's view of a data set:
augmentation seeded per ``(seed, epoch, index)`` (the same images whatever the number of DataLoader
workers, and after ``--resume``) and unreadable images replaced by a readable one and reported
with the batch (:func:`collate_reporting`) instead of failing the epoch.
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch.utils.data import Dataset
from torch.utils.data import default_collate as _default_collate

from inference.images import ImageError, read_image_file

from .progress import tqdm

UNREADABLE = (ImageError, OSError)  # what reading one image file can raise: not an image, truncated, I/O


def _min_decode_side(transform) -> int | None:
    """The shorter side ``transform`` needs from the decoder: the evaluation transform's resize size
    (``inference.transforms.EvalPreset``), as the server decodes; a training preset's narrowest random crop at
    its crop size (``training.presets.TrainPreset.min_decode_side``); None (full size) for any other callable."""
    return getattr(transform, "min_decode_side", None)


class LabelledImages(Dataset):
    """Shared ``__len__``/``__getitem__``/cache logic; subclasses set ``classes``, ``paths``, ``labels``.

    ``cache`` is ``None`` (decode ``paths[i]`` on every access) or a uint8 ``(N, C, H, W)`` tensor.

    ``bad_images`` lists the ``(path, reason)`` of the unreadable files that building the cache skipped
    (``max_bad_images``, see :meth:`_build_cache`); they are no longer in ``paths``/``labels``.
    """

    classes: list[str]
    paths: list[str]
    labels: torch.Tensor
    transform = None
    cache: torch.Tensor | None = None
    bad_images: list[tuple[str, str]] = []

    def _build_cache(self, cache_transform, *, progress: bool, desc: str, max_bad_images: int | None = None) -> None:
        """Decode every image once. An unreadable file is an error naming it, or with ``max_bad_images``
        (a number) skipped and listed in ``bad_images``, up to that many (then an error)."""
        min_side = _min_decode_side(cache_transform)
        images, keep, self.bad_images = [], [], []
        for i, p in enumerate(tqdm(self.paths, desc=desc, disable=not progress, mininterval=1.0)):
            try:
                image = read_image_file(p, min_side=min_side)
            except UNREADABLE as e:
                if max_bad_images is None:
                    raise ImageError(f"{p}: cannot read the image: {e}") from None
                self.bad_images.append((p, str(e)))
                check_bad_images(len(self.bad_images), max_bad_images, example=p)
                continue
            images.append(cache_transform(image))
            keep.append(i)
        if not images:
            raise ValueError(f"{desc}: none of the {len(self.paths)} images could be read")
        if self.bad_images:
            self.paths = [self.paths[i] for i in keep]
            self.labels = self.labels[keep]
        self.cache = torch.stack(images)

    def _load(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        try:
            return read_image_file(path, min_side=_min_decode_side(self.transform))
        except UNREADABLE as e:
            if os.path.islink(path) and not os.path.exists(path):  # `split --mode symlink`, originals moved
                raise ImageError(f"{path}: a symlink to {os.readlink(path)}, which no longer exists (the originals of "
                                 "a `split --mode symlink` moved or deleted? split again)") from None
            raise ImageError(f"{path}: cannot read the image: {e}") from None

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


class LazyDataset(Dataset):
    """``(load(i), label)`` for ``i < n``: images computed on access (mean/std, unlabelled folders)."""

    def __init__(self, n: int, load, label: int = 0):
        self.n, self.load, self.label = n, load, label

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.load(i), self.label


def check_bad_images(count: int, max_bad_images: int, *, example: str = "") -> None:
    """The clear error once more than ``max_bad_images`` training images could not be read."""
    if count > max_bad_images:
        raise ValueError(f"{count} training images could not be read (more than --max-bad-images "
                         f"{max_bad_images}){', e.g. ' + example if example else ''}: fix or remove them, or "
                         "raise --max-bad-images")


def stratified_split(labels, fraction: float, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(keep, held_out)`` index lists (ascending): ``round(fraction * n_c)`` images of every class
    ``c`` held out, at least one of a class with two or more images and never all of them; which
    ones is a permutation seeded by ``seed`` (the same split on every machine and every resume)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), not {fraction}")
    generator = torch.Generator().manual_seed(int(seed))
    held = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = max(1, k)
        k = min(k, n - 1)
        if k > 0:
            held += members[torch.randperm(n, generator=generator)[:k]].tolist()
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def relative_paths(ds) -> list[str]:
    """``ds.paths`` relative to ``ds.root`` where they lie under it (so a moved data folder compares equal)."""
    return _relative(ds.paths, str(getattr(ds, "root", "") or ""))


def _relative(paths: list[str], root: str) -> list[str]:
    return [p[len(root):].lstrip("/\\") if root and p.startswith(root) else p for p in paths]


def split_digest(ds) -> str:
    """A short fingerprint of which images a split holds (``--resume`` checks the validation split; the
    checkpoint records it as ``selection.digest``)."""
    return paths_digest(ds.paths, ds.labels.tolist(), root=str(getattr(ds, "root", "") or ""))


def paths_digest(paths: list[str], labels: list[int], *, root: str) -> str:
    """:func:`split_digest` of the images ``paths`` (labelled ``labels``) of a data set rooted at ``root``."""
    h = hashlib.sha256()
    for p, y in zip(_relative(paths, root), labels):
        h.update(f"{p}\t{y}\n".encode("utf-8", "surrogateescape"))  # a name of undecodable bytes: those bytes
    return h.hexdigest()[:16]


class ImageSubset(Dataset):
    """The images ``indices`` of ``ds`` (a :class:`LabelledImages`) with the same interface: ``classes``,
    ``paths``, ``labels``, ``read(i)`` and ``(transform(image), label)`` items, ``transform`` being
    ``ds.transform`` unless given. A validation split carved from the training images is one (with
    the evaluation transform); the rest of the training images another."""

    def __init__(self, ds, indices, *, transform="inherit"):
        self.ds = ds
        self.indices = [int(i) for i in indices]
        self.classes = list(ds.classes)
        self.paths = [ds.paths[i] for i in self.indices]
        self.labels = ds.labels[self.indices] if self.indices else ds.labels[:0]
        self.root = getattr(ds, "root", None)
        self.transform = ds.transform if transform == "inherit" else transform
        self.cache = None  # the images stay in ds.cache (no copy); read() reaches them
        self.cached = getattr(ds, "cache", None) is not None

    def read(self, i: int) -> torch.Tensor:
        return self.ds.read(self.indices[i])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.read(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one training sample in one epoch."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 1_000_000_007 + int(index)) % (2 ** 63)


class TrainingImages(Dataset):
    """The training loader's view of ``ds`` (``read(i)``, ``labels``, ``paths``, ``transform``).

    Items are ``(image, label, bad)``: ``bad`` lists the ``(path, reason)`` of unreadable files met on
    the way. An unreadable image is replaced by the next readable one (``i + 1``, ``i + 2``, ...; its
    label with it), so batches keep their size on every process; more than ``max_bad_images`` in a
    row is an error. Keys are indices or ``(epoch, index)`` pairs (:class:`training.sampling.EpochSampler`):
    with a pair and ``seed`` the transform runs on torch's CPU generator seeded by
    :func:`sample_seed` (and the caller's generator state is restored afterwards), so a sample's
    augmentation depends only on ``(seed, epoch, index)``: the same with 0 or N DataLoader workers
    (whose own generators cannot be checkpointed) and after ``--resume``.
    """

    def __init__(self, ds, *, seed: int | None = None, max_bad_images: int = 0, transform="inherit"):
        self.ds = ds
        self.seed = seed
        self.max_bad_images = int(max_bad_images)
        self.transform = ds.transform if transform == "inherit" else transform
        self.classes, self.paths, self.labels = ds.classes, ds.paths, ds.labels
        self.root = getattr(ds, "root", None)

    def __len__(self) -> int:
        return len(self.ds)

    def read_robust(self, i: int) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
        """``(image before the transform, label, bad)`` of item ``i`` or of the readable one replacing it."""
        bad = []
        n = len(self.ds)
        for step in range(n):
            j = (i + step) % n
            try:
                return self.ds.read(j), int(self.labels[j]), bad
            except UNREADABLE as e:
                bad.append((self.ds.paths[j], str(e)))
                check_bad_images(len(bad), self.max_bad_images, example=bad[0][0])
        raise ValueError(f"none of the {n} training images could be read, e.g. {bad[0][0]}: {bad[0][1]}")

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        image, label, bad = self.read_robust(int(i))
        if self.transform is not None:
            if self.seed is not None and epoch is not None:
                with torch.random.fork_rng(devices=[]):  # the CPU generator only; restored on exit
                    torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                    image = self.transform(image)
            else:
                image = self.transform(image)
        return image, label, bad


class ReadableImages(Dataset):
    """Evaluation's view of ``ds`` (a validation folder or the test split, decoded on access): items
    ``(image or None, label, bad)``; an unreadable file gives ``None`` and its ``(path, reason)`` in ``bad``, and
    :func:`collate_readable` leaves it out of its batch. The metrics are then over the readable images and the
    caller names the others (not the next image in its place, which would count one image twice)."""

    def __init__(self, ds):
        self.ds = ds
        self.classes, self.paths, self.labels = ds.classes, ds.paths, ds.labels
        self.root = getattr(ds, "root", None)

    @property
    def cache(self):
        return getattr(self.ds, "cache", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            image, label = self.ds[i]
        except UNREADABLE as e:
            return None, int(self.labels[i]), [(self.paths[i], str(e))]
        return image, label, []


def collate_readable(batch):
    """:func:`collate_reporting` of the readable items of ``batch`` (``images`` and ``labels`` are ``None``
    when none is)."""
    readable = [(image, label) for image, label, _ in batch if image is not None]
    images, labels = _default_collate(readable) if readable else (None, None)
    return images, labels, [b for _, _, bad in batch for b in bad]


def unreadable_line(path: str, reason) -> str:
    """The line that names a skipped unreadable image on stderr (its reason often names the path already)."""
    reason = str(reason)
    return f"skipped unreadable image {reason if path in reason else f'{path}: {reason}'}"


def collate_reporting(batch):
    """``default_collate`` of the ``(image, label)`` parts plus one flat list of the batch's
    unreadable ``(path, reason)`` pairs: ``(images, labels, bad)`` (workers pass it to the main process)."""
    images, labels = _default_collate([(image, label) for image, label, _ in batch])
    return images, labels, [b for _, _, bad in batch for b in bad]
