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


def test_validation_or_calibration_images_that_are_test_images_are_refused(tmp_path):
    """Never judged on the test images, whatever path names them: the same files (a link to the test folder,
    --data naming the data-set root whose test/ it reads) or a byte-for-byte copy of them; a duplicate or two
    between real splits is let through (MAX_TEST_COPIES)."""
    import os
    import shutil

    from export.splits import MAX_TEST_COPIES, check_apart
    from inference.image_files import image_files

    data = write_shapes(tmp_path / "data", {"train": 12, "test": 8})
    test = image_files(str(data / "test"))
    os.symlink(data / "test", tmp_path / "linked")
    with pytest.raises(ValueError, match=r"^24 of the 24 validation images are test images \(e\.g\. .*linked.*\): "
                                         r"the test images judge the graph last; pass --val-data with other images$"):
        check_apart(image_files(str(tmp_path / "linked")), test, what="validation", option="--val-data")
    shutil.copytree(data / "test", tmp_path / "copy")
    with pytest.raises(ValueError, match=r"^24 of the 24 calibration images are copies of test images"):
        check_apart(image_files(str(tmp_path / "copy")), test, what="calibration", option="--calib-data")
    train = image_files(str(data / "train"))
    check_apart(train, test, what="validation", option="--val-data")  # other images: fine
    assert MAX_TEST_COPIES * len(train + test[:1]) < 1
    shutil.copy(test[0], tmp_path / "dup.png")
    with pytest.raises(ValueError, match="1 of the 37 validation images are copies"):  # over 1% of 37
        check_apart(train + [str(tmp_path / "dup.png")], test, what="validation", option="--val-data")
    check_apart(train * 3 + [str(tmp_path / "dup.png")], test, what="validation", option="--val-data")  # 1 of 109


def test_export_refuses_a_copy_of_the_test_split_as_validation_before_writing(checkpoint, image_folder, tmp_path):
    import shutil

    from export.__main__ import main as export_main

    val = shutil.copytree(image_folder / "test", tmp_path / "val_copy")
    with pytest.raises(SystemExit, match=r"^error: \d+ of the \d+ validation images are copies of test images .*"
                                         r"pass --val-data with other images$"):
        export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "ex"), "--formats", "openvino-int8",
                     "--data", str(image_folder / "test"), "--val-data", str(val)])
    assert not (tmp_path / "ex" / "export.json").exists()
