"""Model selection (training.engine, training.formats.build_splits): best.pt is chosen on a validation
split (a val/ folder or a stratified, seeded fraction of train/), the test split is read once, after
the last epoch, and every file says which split its numbers are on."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils.data import Dataset

from tests.conftest import TINY_KWARGS
from tests.training.conftest import write_shapes
from training.config import TrainConfig
from training.datasets import stratified_split
from training.engine import Trainer
from training.formats import build_splits
from training.run_log import LOG_COLUMNS


def _cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(data=str(data), out=str(out), model_kwargs=TINY_KWARGS, input_size=16, batch_size=8,
                                 epochs=3, progress=False), **kw})


class Watched(Dataset):
    """A data set that records, for every item read, how many epochs the trainer had finished."""

    def __init__(self, ds, trainer):
        self.ds, self.trainer, self.reads = ds, trainer, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads.append((len(self.trainer.history), i))
        return self.ds[i]


@pytest.fixture(scope="module")
def three_split_folder(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("three_splits"), {"train": 10, "val": 3, "test": 4})


@pytest.mark.parametrize("layout", ["carved", "val_folder", "no_val"])
def test_the_test_split_is_read_once_after_the_last_epoch(small_folder, three_split_folder, tmp_path, layout, capsys):
    data = three_split_folder if layout == "val_folder" else small_folder
    kw = {"val_fraction": 0.0} if layout == "no_val" else {}
    trainer = Trainer(_cfg(data, tmp_path / "run", ema=True, ema_decay=0.9, **kw))
    assert trainer.test_ds.cache is None  # not even decoded at start-up
    trainer.test_ds = Watched(trainer.test_ds, trainer)
    val_reads = None
    if trainer.val_ds is not None:
        trainer.val_ds = Watched(trainer.val_ds, trainer)
        trainer.val_loader = torch.utils.data.DataLoader(trainer.val_ds, batch_size=16,
                                                         collate_fn=trainer.val_loader.collate_fn)
        val_reads = trainer.val_ds.reads
    best = trainer.run()
    n_test = len(trainer.test_ds)
    assert sorted(i for _, i in trainer.test_ds.reads) == list(range(n_test))  # every test image, once
    assert {epochs for epochs, _ in trainer.test_ds.reads} == {3}  # and only after the 3rd epoch
    printed = capsys.readouterr().out
    assert "evaluated once, at the end" in printed
    report = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert report["split"] == "test" and report["images"] == n_test == 12
    assert report["top1"] == best["test_top1"] and best["test_images"] == n_test
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["metrics"]["test_top1"] == report["top1"] and ckpt["epoch"] == report["epoch"] == best["epoch"]
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == LOG_COLUMNS and not any("test" in c for c in LOG_COLUMNS)
    if layout == "no_val":
        assert val_reads is None and report["selected_on"]["split"] is None
        assert best["epoch"] == 3 and best["weights"] == "ema"  # the last epoch, said so
        assert "no validation split" in printed and all(r["val_top1"] == "" for r in rows)
    else:
        assert {epochs for epochs, _ in val_reads} == {0, 1, 2}  # each epoch, before it is logged
        n_val = len(trainer.val_ds)
        assert n_val == (9 if layout == "val_folder" else 3)  # val/: 3 x 3; carved: 10% of 3 x 12, at least 1
        assert len(val_reads) == 3 * 2 * n_val  # model and EMA, 3 epochs
        assert report["selected_on"]["split"] == "val" and report["selected_on"]["images"] == n_val
        assert all(r["val_top1"] != "" and r["val_top1_ema"] != "" for r in rows)
        top = max((float(r["val_top1"]), float(r["val_top1_ema"])) for r in rows)
        assert best["selected_val_top1"] == pytest.approx(max(top), abs=1e-5)
        if layout == "val_folder":
            assert report["selected_on"]["source"] == str(three_split_folder / "val")


def test_best_pt_is_written_before_last_pt(small_folder, tmp_path, monkeypatch):
    import training.engine as engine
    order = []
    real = engine.save_checkpoint

    def recording(path, *args, **kwargs):
        order.append((kwargs["extra"]["epoch"], str(path).rsplit("/", 1)[-1]))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(engine, "save_checkpoint", recording)
    Trainer(_cfg(small_folder, tmp_path / "run", epochs=2, val_fraction=0.0)).run()  # every epoch improves
    assert order == [(1, "best.pt"), (1, "last.pt"), (2, "best.pt"), (2, "last.pt")]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["best"]["epoch"] == 2


def test_early_stopping_needs_a_validation_split(small_folder, tmp_path):
    with pytest.raises(ValueError, match="--early-stopping needs a validation split"):
        Trainer(_cfg(small_folder, tmp_path / "run", val_fraction=0.0, early_stopping=2))


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = [0] * 20 + [1] * 10 + [2] * 2
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert sorted(keep + held) == list(range(32)) and not set(keep) & set(held)
    assert [sum(labels[i] == c for i in held) for c in range(3)] == [2, 1, 1]  # rounded, at least one
    assert stratified_split(labels, 0.1, seed=0) == (keep, held)
    assert stratified_split(labels, 0.1, seed=1)[1] != held
    assert stratified_split(labels, 0.0) == (list(range(32)), [])
    assert stratified_split([0, 1, 1], 0.5)[1] == [1] or stratified_split([0, 1, 1], 0.5)[1] == [2]  # never a class's last


def test_build_splits_layouts(small_folder, three_split_folder, inat_folder, tmp_path):
    s = build_splits(three_split_folder, progress=False)  # train/ val/ test/: val/ chooses, the fraction is unused
    assert (len(s.train), len(s.val), len(s.test), s.val_carved) == (30, 9, 12, False)
    s = build_splits(small_folder, val_fraction=0.25, progress=False)  # train/ test/: carved from train/
    assert (len(s.train), len(s.val), len(s.test), s.val_carved) == (27, 9, 12, True)
    assert not set(s.train.paths) & set(s.val.paths) and "held out of" in s.val_name
    s = build_splits(inat_folder, val_fraction=0.4, progress=False)  # iNat: val.json is the test split
    assert s.test_name.endswith("val.json") and s.val_carved and len(s.val) == 3
    with pytest.raises(ValueError, match="holds out no image"):
        build_splits(write_shapes(tmp_path / "single", {"train": 1, "test": 1}), val_fraction=0.1, progress=False)
