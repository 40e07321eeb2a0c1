import csv
import json
import shutil

import pytest
import torch

from tests.conftest import TINY_KWARGS
from training.__main__ import main
from training.checkpoint import load_checkpoint, load_model


@pytest.fixture(scope="module")
def run_dir(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    import json
    main(["train", "--data", str(image_folder), "--arch", "cbam_resnet", "--model-kwargs", json.dumps(TINY_KWARGS),
          "--epochs", "8", "--batch-size", "16", "--input-size", "16", "--lr", "3e-3", "--out", str(out)])
    return out


def test_train_writes_checkpoints_and_log(run_dir):
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()
    with open(run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_checkpoint_is_self_describing_and_weights_only(run_dir):
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)  # no arbitrary unpickling
    assert ckpt["arch"] == "cbam_resnet" and ckpt["class_names"] == ["circle", "horizontal", "vertical"]
    assert ckpt["input_size"] == 16 and len(ckpt["mean"]) == 3 and len(ckpt["std"]) == 3
    spec, model = load_model(run_dir / "best.pt")
    assert spec.model_kwargs == TINY_KWARGS
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_learns_the_shapes(run_dir):
    _, _, ckpt = load_checkpoint(run_dir / "best.pt")
    assert ckpt["metrics"]["test_top1"] > 0.6  # chance is 1/3


def test_evaluate_writes_metrics_predictions_and_plots(run_dir, image_folder, capsys):
    out = run_dir / "eval"
    main(["evaluate", "--checkpoint", str(run_dir / "best.pt"), "--data", str(image_folder / "test"),
          "--tta", "flip", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "top-1" in printed and "macro avg" in printed  # the classification report
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 90 and {"path", "label", "label_name", "pred", "pred_name", "confidence"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"top1", "top3", "top5", "macro_precision", "macro_recall", "macro_f1", "per_class"} <= set(metrics)
    assert [p.rsplit("/", 1)[1] for p in metrics["plots"]] == [  # written last: the file is the returned dict
        "confusion_matrix.png", "per_class_accuracy.png", "calibration.png", "training_curves.png"]
    assert 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0 and sum(b["images"] for b in metrics["calibration"]) == 90
    assert "ECE " in printed
    assert set(metrics["per_class"]) == {"circle", "horizontal", "vertical"}
    assert metrics["top1"] == pytest.approx(sum(r["label"] == r["pred"] for r in rows) / 90)
    for png in ("confusion_matrix.png", "per_class_accuracy.png", "calibration.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000
    # the same folder for a checkpoint with no log.csv beside it: the run's curves no longer stand there as its own
    elsewhere = run_dir.parent / f"{run_dir.name}-copy"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(run_dir / "best.pt", elsewhere / "best.pt")
    main(["evaluate", "--checkpoint", str(elsewhere / "best.pt"), "--data", str(image_folder / "test"), "--out", str(out)])
    assert not (out / "training_curves.png").exists() and (out / "confusion_matrix.png").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")


def test_a_set_smaller_than_one_batch_trains_with_a_smaller_batch(tmp_path, capsys):
    from tests.training.conftest import write_shapes
    data = write_shapes(tmp_path / "tiny", {"train": 3, "test": 1})  # 9 training images
    out = tmp_path / "run"
    main(["train", "--data", str(data), "--arch", "cbam_resnet", "--model-kwargs", json.dumps(TINY_KWARGS),
          "--epochs", "1", "--batch-size", "64", "--input-size", "16", "--val-fraction", "0", "--out", str(out)])
    assert "--batch-size 64 is larger than the 9 training images per process; training with batches of 9" in \
        capsys.readouterr().err
    assert (out / "best.pt").is_file()


def _tiny_run(data, out, *extra):
    return ["train", "--data", str(data), "--model-kwargs", json.dumps(TINY_KWARGS), "--epochs", "1", "--batch-size",
            "12", "--input-size", "16", "--out", str(out), "--no-progress", *extra]


def test_a_forced_run_that_fails_before_its_first_checkpoint_keeps_the_old_run(small_folder, tmp_path, monkeypatch):
    """`train --force` deleted the run it replaced as it started: a failure in its first epoch (here Ctrl-C; an
    unreadable image over --max-bad-images, an out-of-memory error) left neither run."""
    from training.engine import Trainer
    out = tmp_path / "run"
    main(_tiny_run(small_folder, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(self, epoch):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(_tiny_run(small_folder, out, "--force", "--seed", "1"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # every file, byte for byte; no lock left
    monkeypatch.undo()
    from training.run_folder import claim_run_folder, set_aside, unlock_run_folder
    set_aside(str(out), claim_run_folder(str(out), force=True))  # as a forced run killed (-9) in its epoch 1 leaves
    unlock_run_folder(str(out))
    with pytest.raises(FileNotFoundError, match=r"was killed before its first checkpoint: the run it replaced is in"):
        load_checkpoint(out / "best.pt")  # what evaluate and export say meanwhile
    main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", "--no-progress"])  # was: checkpoint not found
    with open(out / "log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2] and not (out / ".replaced").exists()
    main(_tiny_run(small_folder, out, "--force", "--seed", "1"))  # a forced run that succeeds replaces it
    assert (out / "best.pt").read_bytes() != before["best.pt"] and not (out / ".replaced").exists()


def test_resuming_a_moved_run_goes_on_in_its_new_folder(small_folder, tmp_path):
    """The saved configuration's --out was taken as it was: a run moved from A to B and resumed from B/last.pt
    trained into a new A, leaving B at its old epoch."""
    first, moved = tmp_path / "A", tmp_path / "B"
    main(_tiny_run(small_folder, first))
    first.rename(moved)
    main(["train", "--resume", str(moved / "last.pt"), "--epochs", "2", "--no-progress"])
    assert not first.exists()
    with open(moved / "log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
