"""export.splits: the validation split an INT8 export is judged on is the one that chose the checkpoint, or
none (refused, naming --val-data/--calib-data); never training images passed off as held out."""
import json

import pytest

from export.splits import held_out
from tests.conftest import TINY_KWARGS
from tests.training.conftest import write_shapes
from training.__main__ import main
from training.checkpoint import load_checkpoint


def _train(data, out) -> dict:
    assert main(["train", "--data", str(data), "--model-kwargs", json.dumps(TINY_KWARGS), "--epochs", "1",
                 "--input-size", "16", "--batch-size", "12", "--val-fraction", "0.34", "--out", str(out),
                 "--no-progress"]) == 0
    spec, _, ckpt = load_checkpoint(out / "best.pt")
    return dict(checkpoint_config=ckpt["config"], class_names=spec.class_names, selection=ckpt["selection"])


def test_the_rebuilt_split_is_the_one_that_chose_the_checkpoint_even_past_an_unreadable_image(tmp_path):
    """Training (caching) leaves an unreadable image out before it splits, export's scan of DATA/train did not:
    one bad file moved every class's split, so INT8 was judged on training images. The checkpoint's digest of
    its validation split tells them apart; the rebuild then leaves out what does not decode, as training did."""
    data = write_shapes(tmp_path / "data", {"train": 12, "test": 4})
    (data / "train" / "circle" / "000_bad.png").write_bytes(b"not a png")
    run = _train(data, tmp_path / "run")
    split = held_out(**run, calib_images=10_000)
    assert len(split.val_paths) == run["selection"]["images"]
    assert not any("_bad" in p for p in split.val_paths + split.calib_paths)
    (data / "train" / "circle" / "zz_new.png").write_bytes((data / "train" / "circle" / "001.png").read_bytes())
    with pytest.raises(ValueError, match=r"is not the one that chose this checkpoint \(its images differ: the data "
                                         r"changed since training\): pass --val-data \(labelled, not the test split\)"
                                         r" and --calib-data"):
        held_out(**run)
    other = held_out(**run, val_data=str(data / "test"), calib_data=str(data / "train"))  # what the message says
    assert other.val_source.endswith(str(data / "test"))


def test_a_val_folder_with_an_unreadable_image_is_rebuilt_as_training_read_it(tmp_path):
    data = write_shapes(tmp_path / "data", {"train": 12, "val": 4, "test": 4})
    (data / "val" / "circle" / "000_bad.png").write_bytes(b"not a png")
    run = _train(data, tmp_path / "run")
    split = held_out(**run, calib_images=10_000)
    assert len(split.val_paths) == run["selection"]["images"] == 12 and split.val_source.endswith("data/val")


def test_a_run_on_another_data_format_names_what_to_pass(tmp_path):
    (tmp_path / "inat" / "train").mkdir(parents=True)
    (tmp_path / "inat" / "train.json").write_text("{}")
    with pytest.raises(ValueError, match=r"rebuilt from an ImageFolder tree only, and .*inat is inat: pass --val-data"):
        held_out(checkpoint_config={"data": str(tmp_path / "inat"), "format": "auto", "val_fraction": 0.1},
                 class_names=["a"])
    data = write_shapes(tmp_path / "both", {"train": 12, "test": 4})  # told imagefolder: read as training read it
    (data / "train.json").write_text("{}")
    split = held_out(checkpoint_config={"data": str(data), "format": "imagefolder", "val_fraction": 0.25},
                     class_names=["circle", "horizontal", "vertical"])
    assert len(split.val_paths) == 9
