import csv
import json
import warnings

import pytest
import torch
from PIL import Image

from training.reports import (
    classification_metrics,
    classification_report,
    confusion_matrix,
    label_layout,
    plot_confusion_matrix,
    plot_per_class_accuracy,
    plot_training_curves,
    read_log,
    topk_accuracy,
    write_predictions_csv,
)

NAMES = ["cat", "dog", "bird", "fish"]


def one_hot_probs(preds, second, third=None, k=4):
    """Rows ranked prediction (0.6) > runner-up (0.3) > third (0.07, when given) > the rest."""
    rows = torch.arange(len(preds))
    p = torch.full((len(preds), k), 0.1 / (k - 2))
    if third is not None:
        p = torch.full((len(preds), k), 0.03 / (k - 3))
        p[rows, torch.tensor(third)] = 0.07
    p[rows, torch.tensor(second)] = 0.3
    p[rows, torch.tensor(preds)] = 0.6
    return p


@pytest.fixture
def example():
    # true:  cat cat cat dog dog bird bird bird bird   (fish never occurs, never predicted)
    # pred:  cat cat dog dog cat bird bird cat  dog
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = [0, 0, 1, 1, 0, 2, 2, 0, 1]
    second = [1, 1, 0, 0, 1, 0, 0, 2, 3]
    third = [2, 2, 2, 2, 2, 1, 1, 1, 0]  # row 8: the true bird ranks last
    return one_hot_probs(preds, second, third), labels


def test_metrics_by_hand(example):
    probs, labels = example
    m = classification_metrics(probs, labels, NAMES)
    assert set(m) == {"top1", "top3", "top5", "macro_precision", "macro_recall", "macro_f1", "per_class",
                      "confusion", "most_confused", "images"}
    assert [(c["true"], c["predicted"], c["images"]) for c in m["most_confused"]] == [
        (NAMES[0], NAMES[1], 1), (NAMES[1], NAMES[0], 1), (NAMES[2], NAMES[0], 1), (NAMES[2], NAMES[1], 1)]
    assert m["images"] == 9
    assert m["confusion"] == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]
    assert m["top1"] == pytest.approx(5 / 9)
    # top-3 misses only row 8 (true bird ranked 4th)
    assert m["top3"] == pytest.approx(8 / 9)
    assert m["top5"] == 1.0  # capped at 4 classes
    cat, dog, bird, fish = (m["per_class"][n] for n in NAMES)
    assert cat == pytest.approx({"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7, "accuracy": 2 / 3, "support": 3})
    assert dog == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4, "accuracy": 0.5, "support": 2})
    assert bird == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "accuracy": 0.5, "support": 4})
    assert fish == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.0, "support": 0}
    # macro over the 3 classes seen in labels or predictions (fish is neither)
    assert m["macro_precision"] == pytest.approx((0.5 + 1 / 3 + 1.0) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx((4 / 7 + 0.4 + 2 / 3) / 3)
    assert isinstance(m["top1"], float) and isinstance(cat["support"], int)


def test_zero_division_gives_zero_without_warnings():
    probs = one_hot_probs([0, 0], [1, 1])  # 'dog' is a true class never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(probs, torch.tensor([0, 1]), NAMES)
        empty = classification_metrics(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), NAMES)
    assert m["per_class"]["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.0, "support": 1}
    assert m["macro_precision"] == pytest.approx(0.25)
    assert empty["top1"] == 0.0 and empty["macro_f1"] == 0.0 and empty["images"] == 0


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1]), NAMES)
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(torch.zeros(2, 4), torch.tensor([0, 4]), NAMES)


def test_helpers():
    assert confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]), 2).tolist() == [[1, 1], [0, 1]]
    assert topk_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([0, 0]), 5) == 1.0
    assert label_layout(10) == (9.0, 1) and label_layout(100) == (7.0, 1) and label_layout(250)[1] == 3


def test_report_text(example):
    probs, labels = example
    text = classification_report(classification_metrics(probs, labels, NAMES))
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["cat", "0.500", "0.667", "0.571", "3"]
    assert "fish" in text
    body = {line.split()[0] if not line.strip().startswith(("macro", "weighted", "top-3")) else
            " ".join(line.split()[:2]): line.split() for line in lines if line.strip()}
    assert body["accuracy"][-2:] == ["0.556", "9"]
    assert body["top-3 accuracy"][-2:] == ["0.889", "9"]
    assert "top-5" not in text  # not below the class count
    assert body["macro avg"][2:] == ["0.611", "0.556", "0.546", "9"]
    # weighted by support: (3*.5 + 2*.333 + 4*1) / 9 ...
    assert body["weighted avg"][2] == f"{(3 * 0.5 + 2 / 3 + 4) / 9:.3f}"


def png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_confusion_matrix_plots(tmp_path, example):
    probs, labels = example
    m = classification_metrics(probs, labels, NAMES)
    out = plot_confusion_matrix(m["confusion"], NAMES, tmp_path / "sub" / "cm.png")
    assert out == str(tmp_path / "sub" / "cm.png")
    w, h = png_size(out)
    assert 300 < w < 2000 and 300 < h < 2000
    assert png_size(plot_confusion_matrix(m["confusion"], NAMES, tmp_path / "counts.png", normalize=False))
    with pytest.raises(ValueError, match="4x4"):
        plot_confusion_matrix([[1]], NAMES, tmp_path / "bad.png")


def test_confusion_matrix_with_100_classes(tmp_path):
    k = 100
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(k).repeat(5)
    probs = torch.rand(len(labels), k, generator=g)
    probs[torch.arange(len(labels)), labels] += 0.7  # mostly right
    names = [f"class_{i:03d}" for i in range(k)]
    m = classification_metrics(probs, labels, names)
    w, h = png_size(plot_confusion_matrix(m["confusion"], names, tmp_path / "cm100.png"))
    assert 1500 < w < 4500 and 1500 < h < 4500
    w, h = png_size(plot_per_class_accuracy(m, tmp_path / "acc100.png"))
    assert h > 1500 and 400 < w < 1500


def test_per_class_accuracy_plot(tmp_path, example):
    probs, labels = example
    m = classification_metrics(probs, labels, NAMES)
    w, h = png_size(plot_per_class_accuracy(m, tmp_path / "acc.png"))
    assert 300 < w < 1500 and 150 < h < 1000


def write_log(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_training_curves(tmp_path):
    full = write_log(tmp_path / "log.csv", ["epoch", "train_loss", "test_loss", "test_top1", "test_top5", "lr",
                                            "seconds"],
                     [[e, 2.0 / e, 2.2 / e, 0.1 * e, 0.2 * e, 1e-3 / e, 3.0] for e in range(1, 6)])
    w3, h = png_size(plot_training_curves(full, tmp_path / "curves.png"))
    assert 800 < w3 < 2500 and 250 < h < 800
    # the current engine's log: no test_loss; a blank cell is tolerated
    minimal = write_log(tmp_path / "old.csv", ["epoch", "train_loss", "test_top1", "test_top5", "lr", "seconds"],
                        [[1, 1.0, 0.5, 0.9, "1e-3", 2], [2, 0.8, "", 0.95, "5e-4", 2]])
    assert read_log(minimal)["test_top1"][0] == 0.5
    assert png_size(plot_training_curves(minimal, tmp_path / "old.png"))
    only_loss = write_log(tmp_path / "loss.csv", ["train_loss"], [[1.0], [0.5]])
    w1, _ = png_size(plot_training_curves(only_loss, tmp_path / "loss.png"))
    assert w1 < w3  # one panel
    with pytest.raises(ValueError, match="no rows"):
        plot_training_curves(write_log(tmp_path / "empty.csv", ["epoch", "lr"], []), tmp_path / "x.png")
    with pytest.raises(ValueError, match="no loss"):
        plot_training_curves(write_log(tmp_path / "sec.csv", ["epoch", "seconds"], [[1, 2]]), tmp_path / "x.png")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predictions_csv(tmp_path, example):
    probs, labels = example
    paths = [f"img{i}.png" for i in range(9)]
    rows = read_csv(write_predictions_csv(tmp_path / "p.csv", paths, labels, probs, NAMES))
    assert list(rows[0]) == ["path", "label", "label_name", "pred", "pred_name", "confidence"]
    assert rows[2] == {"path": "img2.png", "label": "0", "label_name": "cat", "pred": "1", "pred_name": "dog",
                       "confidence": "0.600000"}
    rows = read_csv(write_predictions_csv(tmp_path / "u.csv", paths, None, probs, NAMES, topk=2))
    assert rows[0]["label"] == rows[0]["label_name"] == ""
    assert list(rows[0])[6:] == ["top2", "top2_name", "top2_confidence"]
    assert (rows[8]["pred_name"], rows[8]["top2_name"], rows[8]["top2_confidence"]) == ("dog", "fish", "0.300000")
    rows = read_csv(write_predictions_csv(tmp_path / "all.csv", paths, [-1] * 9, probs, NAMES, topk=10))
    assert rows[0]["label"] == "" and "top4_name" in rows[0] and "top5" not in rows[0]
    with pytest.raises(ValueError, match="8 paths"):
        write_predictions_csv(tmp_path / "bad.csv", paths[:8], labels, probs, NAMES)


def test_tied_scores_give_one_answer_everywhere(tmp_path):
    """torch.topk breaks ties arbitrarily (here class 1 of [.5, .5, 0, 0, 0, 0], class 8 of ten equal scores),
    argmax toward the lower index: a collapsed model (all scores equal) had a top-1 of 0% beside a confusion
    matrix of 100% correct, and a predictions CSV naming another class than the matrix."""
    names = [str(c) for c in range(10)]
    probs = torch.zeros(3, 10)
    probs[0, :2] = 0.5
    probs[1] = 0.1
    probs[2, 3:5] = 0.5
    labels = torch.tensor([0, 0, 3])
    metrics = classification_metrics(probs, labels, names)
    matrix = torch.as_tensor(metrics["confusion"])
    assert topk_accuracy(probs, labels, 1) == pytest.approx(matrix.trace().item() / 3) == pytest.approx(1.0)
    write_predictions_csv(tmp_path / "p.csv", ["x", "y", "z"], labels, probs, names, topk=2)
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["pred"] for r in rows] == [str(i) for i in probs.argmax(1).tolist()] == ["0", "0", "3"]
    assert [r["top2"] for r in rows] == ["1", "1", "4"]


def test_reports_replace_their_files_whole_or_not_at_all(tmp_path, monkeypatch):
    """predictions.csv and the plots are written to a temporary and renamed: a failure while writing leaves the
    earlier file as it was, and no partial or temporary file behind."""
    from matplotlib.figure import Figure

    from training.reports import plot_confusion_matrix, write_predictions_csv
    csv_path, png_path = tmp_path / "predictions.csv", tmp_path / "confusion_matrix.png"
    csv_path.write_text("the earlier predictions")
    png_path.write_bytes(b"the earlier plot")
    with pytest.raises(IndexError):  # a prediction naming a class the list lacks, after some rows were built
        write_predictions_csv(csv_path, ["a.png", "b.png"], [0, 0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]), ["only"])

    def broken_savefig(self, *args, **kwargs):
        args[0].write(b"half a PNG")
        raise OSError("No space left on device")
    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="No space left"):
        plot_confusion_matrix(torch.eye(2, dtype=torch.long), ["a", "b"], png_path)
    assert csv_path.read_text() == "the earlier predictions" and png_path.read_bytes() == b"the earlier plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "predictions.csv"]


def test_classes_of_one_display_name_keep_a_row_each(example):
    """per_class was keyed by name: two classes named "Aster" (class_names.json, an iNat common name) became one
    row, its support short of the images and the weighted average and plot without a class."""
    probs, labels = example
    m = classification_metrics(probs, labels, ["Aster", "dog", "Aster", "fish"])
    assert list(m["per_class"]) == ["Aster [0]", "dog", "Aster [2]", "fish"]
    assert sum(c["support"] for c in m["per_class"].values()) == m["images"] == 9
    assert m["per_class"]["Aster [2]"] == classification_metrics(probs, labels, NAMES)["per_class"][NAMES[2]]
    assert ("Aster [2]", "Aster [0]") in {(c["true"], c["predicted"]) for c in m["most_confused"]}


def test_many_classes_keep_the_confusion_matrixs_cells_not_the_matrix():
    """iNat's 10,000 classes made metrics.json hold a 10,000 x 10,000 matrix (100M numbers: hundreds of MB of JSON,
    GBs of memory to write it) and a plot of it; above DENSE_CONFUSION_MAX classes only the non-zero cells."""
    from training.reports import DENSE_CONFUSION_MAX
    k = 10_000
    labels = torch.tensor([0, 0, 5, 9_999, 9_999, 9_999])
    probs = torch.zeros(len(labels), k)
    probs[torch.arange(6), torch.tensor([0, 7, 5, 5, 5, 9_999])] = 1.0
    m = classification_metrics(probs, labels, [f"c{i}" for i in range(k)])
    assert k > DENSE_CONFUSION_MAX and "confusion" not in m
    assert m["confusion_cells"] == [[0, 0, 1], [0, 7, 1], [5, 5, 1], [9_999, 5, 2], [9_999, 9_999, 1]]
    assert m["most_confused"][0] == {"true": "c9999", "predicted": "c5", "images": 2}
    assert m["per_class"]["c5"]["precision"] == pytest.approx(1 / 3) and m["per_class"]["c9999"]["recall"] == \
        pytest.approx(1 / 3)
    assert len(json.dumps(m)) < 2_000_000
