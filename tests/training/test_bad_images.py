"""Unreadable training images (training.datasets, training.engine): skipped with a warning naming the
file and counted in the log, also when DataLoader workers meet them, up to --max-bad-images."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from tests.conftest import TINY_KWARGS, encode, pattern_image
from training.config import TrainConfig
from training.datasets import TrainingImages, collate_reporting
from training.engine import Trainer
from training.image_folder import ImageFolderDataset


def _truncated_jpeg() -> bytes:
    data = encode(pattern_image("circle", size=64, seed=3), "JPEG", quality=90)
    return data[: len(data) // 3]


@pytest.fixture()
def bad_folder(small_folder, tmp_path):
    """small_folder plus, in train/, bytes that are no image and a truncated JPEG."""
    root = tmp_path / "data"
    shutil.copytree(small_folder, root)
    junk = root / "train" / "circle" / "zz_not_an_image.png"
    junk.write_bytes(b"these bytes are not an image at all")
    truncated = root / "train" / "horizontal" / "zz_truncated.jpg"
    truncated.write_bytes(_truncated_jpeg())
    return root, [str(junk), str(truncated)]


def _cfg(data, out, **kw) -> TrainConfig:
    # 38 training files, batches of 19: every epoch reads every file (drop_last drops nothing)
    return TrainConfig(**{**dict(data=str(data), out=str(out), model_kwargs=TINY_KWARGS, input_size=16, batch_size=19,
                                 epochs=2, progress=False), **kw})


def _log(run) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("variant", ["cache", "no_cache", "workers"])
def test_unreadable_training_images_are_skipped_and_reported(bad_folder, tmp_path, capsys, variant):
    data, bad = bad_folder
    kw = {"cache": {}, "no_cache": {"cache": False}, "workers": {"cache": False, "workers": 1}}[variant]
    # val 0 and fixed mean/std: without a cache, the training loader (in a worker process) meets them first
    run = tmp_path / "run"
    best = Trainer(_cfg(data, run, val_fraction=0.0, normalize="imagenet", **kw)).run()
    err = capsys.readouterr().err
    for path in bad:
        assert err.count(f"warning: skipped unreadable training image {path} (") == 1  # named once, not per epoch
    assert [r["bad_images"] for r in _log(run)] == ["2", "2"]
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["bad_training_images"] == sorted(bad) and best["bad_images"] == 2
    last = torch.load(run / "last.pt", weights_only=True)
    assert sorted(p for p, _ in last["bad_images"]) == sorted(bad)


@pytest.mark.parametrize("cache", [True, False])
def test_more_bad_images_than_the_cap_is_a_clear_error(bad_folder, tmp_path, cache):
    data, _ = bad_folder
    with pytest.raises(ValueError, match=r"2 training images could not be read \(more than --max-bad-images 1\)"):
        Trainer(_cfg(data, tmp_path / "run", val_fraction=0.0, normalize="imagenet", max_bad_images=1,
                     cache=cache)).run()
    with pytest.raises(ValueError, match=r"more than --max-bad-images 0\), e\.g\. .*zz_"):
        Trainer(_cfg(data, tmp_path / "run0", max_bad_images=0, cache=cache)).run()


def test_the_skipped_images_leave_the_cache_and_the_split(bad_folder):
    data, bad = bad_folder
    from inference.transforms import EvalPreset
    ds = ImageFolderDataset(data / "train", cache_transform=EvalPreset(crop_size=16), progress=False,
                            max_bad_images=5)
    assert len(ds) == len(ds.cache) == 36 and sorted(p for p, _ in ds.bad_images) == sorted(bad)
    assert not set(bad) & set(ds.paths) and len(ds.labels) == 36
    with pytest.raises(ValueError, match="zz_not_an_image.png: cannot read the image"):  # strict: names the file
        ImageFolderDataset(data / "train", cache_transform=EvalPreset(crop_size=16), progress=False)


def test_training_images_replace_an_unreadable_one_and_report_it(bad_folder):
    data, bad = bad_folder
    ds = ImageFolderDataset(data / "train")  # no cache: decoded on access
    view = TrainingImages(ds, seed=0, max_bad_images=3)
    i = ds.paths.index(bad[0])  # the last circle; the next image is the first horizontal one
    image, label, met = view[(1, i)]
    assert label == int(ds.labels[i + 1]) and image.shape[0] == 3
    assert [p for p, _ in met] == [bad[0]]
    images, labels, met = collate_reporting([view[(1, i)], view[(1, 0)]])
    assert images.shape[0] == 2 and labels.tolist() == [int(ds.labels[i + 1]), 0] and [p for p, _ in met] == [bad[0]]
    with pytest.raises(ValueError, match="more than --max-bad-images 0"):
        TrainingImages(ds, max_bad_images=0)[i]


def test_augmentation_is_a_function_of_seed_epoch_and_index(small_folder):
    from training.presets import TrainPreset
    ds = ImageFolderDataset(small_folder / "train", transform=TrainPreset(crop_size=16, color_jitter=0.4,
                                                                          random_erase=0.5))
    view = TrainingImages(ds, seed=1)
    torch.manual_seed(0)
    a = view[(3, 5)][0]
    state = torch.get_rng_state()
    torch.manual_seed(1)
    assert torch.equal(view[(3, 5)][0], a)  # whatever the global generator holds
    torch.manual_seed(0)
    view[(3, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # and the global generator is left as it was
    assert not all(torch.equal(view[(e, 5)][0], a) for e in (4, 5, 6))  # another epoch, another augmentation


@pytest.mark.parametrize("where,cache", [("test", False), ("val", False), ("val", True)])
def test_an_unreadable_test_or_val_image_is_left_out_and_named_not_the_end_of_the_run(small_folder, tmp_path, capsys,
                                                                                     where, cache):
    """A corrupt photo that `split` put into test/ (or val/, read per access with --no-cache) used to stop the
    run after all its epochs (test) or the first (val), with no test_metrics.json; in a cached val/ it stopped
    the run before its first epoch, and a skipped one was called a training image."""
    root = tmp_path / "data"
    shutil.copytree(small_folder, root)
    if where == "val":
        shutil.copytree(root / "test", root / "val")
    bad = root / where / "circle" / "zz_broken.jpg"
    bad.write_bytes(_truncated_jpeg())
    run = tmp_path / "run"
    best = Trainer(_cfg(root, run, normalize="imagenet", cache=cache)).run()
    report = json.loads((run / "test_metrics.json").read_text())
    err = capsys.readouterr().err
    if where == "test":
        assert report["unreadable_test_images"] == [str(bad)]
        assert f"warning: test image {bad} left out: " in err
        assert report["images"] == best["test_images"] == len(list((root / "test").rglob("*.png")))
    else:
        assert err.count(f"warning: skipped unreadable validation image {bad} (") == 1  # named once, as what it is
        assert report["unreadable_test_images"] == []
        if cache:  # left out of the cached split (read per access, it is known unreadable only when met)
            assert report["selected_on"]["images"] == len(list((root / "val").rglob("*.png")))
    assert [r["val_top1"] != "" for r in _log(run)] == [True, True]


def test_readable_images_collate_leaves_unreadable_ones_out():
    from training.datasets import ReadableImages, collate_readable

    class Folder:
        classes, paths, labels = ["a", "b"], ["x.png", "y.png", "z.png"], torch.tensor([0, 1, 1])

        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise OSError("truncated")
            return torch.full((3, 2, 2), i, dtype=torch.uint8), int(self.labels[i])

    ds = ReadableImages(Folder())
    images, labels, bad = collate_readable([ds[0], ds[1], ds[2]])
    assert images[:, 0, 0, 0].tolist() == [0, 2] and labels.tolist() == [0, 1] and bad == [("y.png", "truncated")]
    assert collate_readable([ds[1]]) == (None, None, [("y.png", "truncated")])


def test_an_unreadable_image_of_the_carved_validation_split_is_left_out_not_replaced(bad_folder, tmp_path):
    """--no-cache: the validation split carved from train/ read an unreadable photo as the next one (counted
    twice in the top-1 that chooses best.pt); it is now left out and named, as a val/ folder's is."""
    from training.datasets import ReadableImages
    data, bad = bad_folder
    for seed in range(20):  # a seed whose split holds one of the unreadable files out for validation
        trainer = Trainer(_cfg(data, tmp_path / f"run{seed}", cache=False, val_fraction=0.5, normalize="imagenet",
                               seed=seed))
        if held := [i for i, p in enumerate(trainer.val_ds.paths) if p in bad]:
            break
    assert held and isinstance(trainer.val_ds, ReadableImages)
    image, label, reported = trainer.val_ds[held[0]]
    assert image is None and reported[0][0] == trainer.val_ds.paths[held[0]]
    cached = Trainer(_cfg(data, tmp_path / "cached", val_fraction=0.5, normalize="imagenet"))
    assert not set(cached.val_ds.paths) & set(bad)  # cached: skipped while caching, as before
