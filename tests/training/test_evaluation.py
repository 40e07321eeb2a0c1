"""Offline evaluation and prediction (training.evaluation) through the command line: stats, predict,
evaluate on a data-set root."""
import csv
import json

import torch

from tests.conftest import TINY_KWARGS
from training.__main__ import main


def test_stats_and_predict_commands(image_folder, tmp_path, capsys):
    assert main(["stats", "--data", str(image_folder), "--input-size", "16"]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out.splitlines()[0])
    assert len(stats["mean"]) == 3 and all(0 < s < 1 for s in stats["std"]) and stats["images"] == 72
    assert "--normalize " in out
    from training.checkpoint import ModelSpec, save_checkpoint
    spec = ModelSpec(arch="cbam_resnet", class_names=["circle", "horizontal", "vertical"], input_size=16,
                     resize_size=16, mean=tuple(stats["mean"]), std=tuple(stats["std"]), model_kwargs=TINY_KWARGS)
    save_checkpoint(tmp_path / "m.pt", spec, spec.build().eval())
    assert main(["predict", "--checkpoint", str(tmp_path / "m.pt"), "--images", str(image_folder / "test"),
                 "--out", str(tmp_path / "p.csv"), "--topk", "2", "--tta", "flip"]) == 0
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 90 and rows[0]["pred_name"] in spec.class_names and rows[0]["label"] == ""
    assert "top2_name" in rows[0]


def test_predict_skips_and_names_unreadable_files(image_folder, tmp_path, capsys):
    """A corrupt photo among good ones: named on stderr with its reason, left out of the CSV, the rest
    classified exactly as without it; a folder of nothing readable is one clear error."""
    import shutil

    import pytest

    from training.checkpoint import ModelSpec, save_checkpoint
    spec = ModelSpec(arch="cbam_resnet", class_names=["circle", "horizontal", "vertical"], input_size=16,
                     resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, model_kwargs=TINY_KWARGS)
    save_checkpoint(tmp_path / "m.pt", spec, spec.build().eval())
    photos = tmp_path / "photos"
    shutil.copytree(image_folder / "test" / "circle", photos)
    good = sorted(photos.iterdir())
    args = ["predict", "--checkpoint", str(tmp_path / "m.pt"), "--images", str(photos), "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "clean.csv")]) == 0
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "scan.jfif", "Thumbs.db", ".DS_Store"):  # an iPhone's, Windows'
        (photos / name).write_bytes(b"not read")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "p.csv")]) == 0
    captured = capsys.readouterr()
    assert "skipped unreadable image" in captured.err and str(photos / 'broken.jpg') in captured.err
    assert "files of types that are not read are left out (2 .heic, 1 .jfif)" in captured.err  # was silent
    assert f"{len(good)} images classified" in captured.out
    with open(tmp_path / "p.csv") as f, open(tmp_path / "clean.csv") as g:
        assert list(csv.DictReader(f)) == list(csv.DictReader(g))
    for p in good:
        p.unlink()
    with pytest.raises(ValueError, match="none of the 1 files .* is a readable image"):
        main([*args, "--out", str(tmp_path / "none.csv")])


def test_train_and_evaluate_on_cifar_pickles(tmp_path):
    from tests.training.test_cifar import _cifar10
    _cifar10(tmp_path / "cifar", n=16)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "cifar"), "--model-kwargs", json.dumps(TINY_KWARGS),
                 "--epochs", "1", "--batch-size", "8", "--no-progress", "--out", str(run)]) == 0
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert len(ckpt["class_names"]) == 10 and ckpt["input_size"] == 32
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(tmp_path / "cifar"),
                 "--out", str(run / "eval")]) == 0
    assert json.loads((run / "eval" / "metrics.json").read_text())["images"] == 16  # the test_batch


def test_predict_finds_images_behind_symlinked_folders_once_and_skips_hidden_ones(tmp_path):
    from inference.image_files import image_files
    from tests.conftest import encode, pattern_image
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes(encode(pattern_image("circle", size=8)))
    photos = tmp_path / "photos"
    (photos / ".ipynb_checkpoints").mkdir(parents=True)
    (photos / ".ipynb_checkpoints" / "c.png").write_bytes(b"a checkpoint copy")
    (photos / "a.png").write_bytes(encode(pattern_image("circle", size=8)))
    (photos / "._a.png").write_bytes(b"AppleDouble")
    (photos / "linked").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(photos)  # a cycle of links: each real folder is read once
    assert image_files(str(photos)) == [str(photos / "a.png"), str(photos / "linked" / "b.png")]


def test_unreadable_files_that_train_skips_are_skipped_by_evaluate_stats_and_export(small_folder, tmp_path, capsys):
    """`train` skips an unreadable test or training image and says so; `evaluate`, `stats` and the export's
    accuracy, calibration and validation images then stopped on the same file (one bad photo in a user's test
    split broke the README's next two steps). Each now skips it, names it and counts the rest."""
    import shutil

    from export.image_sets import load_calibration, load_eval_set, load_labelled
    from training.checkpoint import load_model
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    for split in ("train", "test"):
        (data / split / "circle" / "zz_truncated.png").write_bytes((data / split / "circle" / "000.png").read_bytes()[:40])
        (data / split / "vertical" / "zz_garbage.jpg").write_bytes(b"not an image at all")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model-kwargs", json.dumps(TINY_KWARGS), "--epochs", "1",
                 "--input-size", "16", "--batch-size", "12", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data / "test"),
                 "--out", str(tmp_path / "eval")]) == 0
    out, err = capsys.readouterr()
    assert "on 12 images (tta=none; 2 unreadable skipped)" in out and err.count("skipped unreadable image") == 2
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sorted(p["path"].rsplit("/", 1)[1] for p in metrics["unreadable_images"]) == ["zz_garbage.jpg",
                                                                                        "zz_truncated.png"]
    with open(tmp_path / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and not any("zz_" in r["path"] for r in rows)
    assert metrics["top1"] == json.loads((run / "test_metrics.json").read_text())["top1"]  # train's own number
    assert main(["stats", "--data", str(data), "--input-size", "16"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out.splitlines()[0])
    assert (stats["images"], stats["unreadable"]) == (36, 2) and err.count("skipped unreadable image") == 2
    spec, _ = load_model(run / "best.pt")
    evalset = load_eval_set(str(data / "test"), spec, count=500)
    assert len(evalset.labels) == 12 and evalset.source.endswith("(2 unreadable skipped)")
    assert load_eval_set(str(data), spec, count=500).source == evalset.source  # the root: its test split
    assert len(load_calibration(str(data / "train"), spec, count=300)) == 36
    paths = [str(data / "train" / "circle" / "zz_truncated.png"), str(data / "train" / "circle" / "000.png")]
    images, labels = load_labelled(paths, [0, 1], spec)
    assert len(images) == 1 and labels.tolist() == [1]


def test_predict_takes_one_image_file(image_folder, tmp_path, capsys):
    """`predict --images photo.jpg` said "folder not found" of a file that exists."""
    from training.checkpoint import ModelSpec, save_checkpoint
    spec = ModelSpec(arch="cbam_resnet", class_names=["circle", "horizontal", "vertical"], input_size=16,
                     resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, model_kwargs=TINY_KWARGS)
    save_checkpoint(tmp_path / "m.pt", spec, spec.build().eval())
    photo = sorted((image_folder / "test" / "circle").iterdir())[0]
    assert main(["predict", "--checkpoint", str(tmp_path / "m.pt"), "--images", str(photo),
                 "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(photo)]


def test_a_tta_whose_views_repeat_is_refused_offline_as_the_server_refuses_it(image_folder, tmp_path):
    """five_crop on a model whose resize size is its input size scored five copies of the plain view and recorded
    "tta": "five_crop" in metrics.json; the server (export archive, inference.settings) refuses it."""
    import pytest

    from training.checkpoint import ModelSpec, save_checkpoint
    from training.evaluation import evaluate, predict_folder
    spec = ModelSpec(arch="cbam_resnet", class_names=["circle", "horizontal", "vertical"], input_size=16,
                     resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, model_kwargs=TINY_KWARGS)
    save_checkpoint(tmp_path / "m.pt", spec, spec.build().eval())
    message = r"--tta five_crop: tta five_crop cuts its views from the resize_size square, and resize_size 16 is " \
              r"input_size 16: every view would be the same image; use flip"
    with pytest.raises(ValueError, match=message):
        evaluate(str(tmp_path / "m.pt"), str(image_folder / "test"), tta="five_crop", progress=False)
    with pytest.raises(ValueError, match=r"--tta multi_scale: tta_scales 1.0, 1.15, 0.87 cut squares of sides "
                                         r"\[16, 16, 14\]"):
        predict_folder(str(tmp_path / "m.pt"), str(image_folder / "test"), out_csv=str(tmp_path / "p.csv"),
                       tta="multi_scale", progress=False)
    assert not (tmp_path / "p.csv").exists()
    wide = ModelSpec(**{**spec.__dict__, "resize_size": 20})
    save_checkpoint(tmp_path / "w.pt", wide, wide.build().eval())
    assert predict_folder(str(tmp_path / "w.pt"), str(image_folder / "test"), out_csv=str(tmp_path / "p.csv"),
                          tta="five_crop", progress=False) == 90
