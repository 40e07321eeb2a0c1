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


def test_a_rebuilt_split_that_differs_from_the_recorded_one_is_refused(tmp_path):
    """Training leaves an unreadable image out before it splits (the cache), the export's scan of DATA/train
    does not: one bad file moved every class's split, so INT8 was judged on training images. The checkpoint's
    digest of its validation split tells them apart."""
    data = write_shapes(tmp_path / "data", {"train": 12, "test": 4})
    clean = _train(data, tmp_path / "clean")
    split = held_out(**clean, calib_images=10_000)  # the same images: accepted
    assert len(split.val_paths) == clean["selection"]["images"]
    (data / "train" / "circle" / "000_bad.png").write_bytes(b"not a png")
    bad = _train(data, tmp_path / "bad")
    with pytest.raises(ValueError, match=r"is not the one that chose this checkpoint .*pass --val-data \(labelled, "
                                         r"not the test split\) and --calib-data"):
        held_out(**bad)
    with pytest.raises(ValueError, match="is not the one that chose"):  # the data changed since the clean run
        held_out(**clean)
    other = held_out(**bad, val_data=str(data / "test"), calib_data=str(data / "train"))  # what the message says
    assert other.val_source.endswith(str(data / "test"))


def test_a_run_on_another_data_format_names_what_to_pass(tmp_path):
    (tmp_path / "inat" / "train").mkdir(parents=True)
    (tmp_path / "inat" / "train.json").write_text("{}")
    with pytest.raises(ValueError, match=r"rebuilt from an ImageFolder tree only, and .*inat is inat: pass --val-data"):
        held_out(checkpoint_config={"data": str(tmp_path / "inat"), "format": "auto", "val_fraction": 0.1},
                 class_names=["a"])
