"""benchmarks.tta_accuracy: adaptive-TTA thresholds are chosen on the validation split that chose the checkpoint,
rebuilt and checked as INT8's export does, never on test images or on training images passed off as held out."""
import json

from benchmarks.tta_accuracy import evaluation_images, main
from tests.conftest import TINY_KWARGS
from tests.training.conftest import write_shapes
from training.__main__ import main as training_main
from training.checkpoint import load_checkpoint
from training.datasets import paths_digest


def test_validation_of_a_checkpoint_is_the_split_that_chose_it_and_refused_once_the_data_changed(tmp_path, capsys):
    data = write_shapes(tmp_path / "data", {"train": 12, "test": 4})
    (data / "train" / "circle" / "000_bad.png").write_bytes(b"not a png")  # training leaves it out before it splits
    run = tmp_path / "run"
    assert training_main(["train", "--data", str(data), "--model-kwargs", json.dumps(TINY_KWARGS), "--epochs", "1",
                          "--input-size", "16", "--batch-size", "12", "--val-fraction", "0.34", "--seed", "3",
                          "--out", str(run), "--no-progress"]) == 0
    _, _, ckpt = load_checkpoint(run / "best.pt")
    paths, labels, source = evaluation_images(validation_of=str(run / "best.pt"))
    assert paths_digest(paths, labels, root=str(data / "train")) == ckpt["selection"]["digest"]
    assert len(paths) == ckpt["selection"]["images"] and "validation split" in source
    assert not any("_bad" in p or "/test/" in p for p in paths)
    every, _, _ = evaluation_images(data=str(data / "train"))
    assert set(paths) < set(every)

    (data / "train" / "circle" / "zz_new.png").write_bytes((data / "train" / "circle" / "001.png").read_bytes())
    capsys.readouterr()
    from inference.cli import run as run_cli
    graph = tmp_path / "model.onnx"  # never reached: the images are refused first
    assert run_cli(main, ["--graph", str(graph), "--validation-of", str(run / "best.pt")], expected=(ValueError,)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not the one that chose this checkpoint" in err and "\n" not in err
