"""Accuracy-controlled INT8 (export.int8) and the images it is calibrated and judged on (export.splits)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from export.int8 import Budget, kept_layers, kept_layers_onnx, resolve_scopes
from export.splits import held_out
from export.verify import problems
from training.checkpoint import load_checkpoint
from training.datasets import stratified_split
from training.image_folder import scan_image_folder


def test_budget_score_is_one_for_fp32_and_negative_past_either_rule():
    b = Budget(max_drop=0.5, min_agreement=0.99, margin=0.5)
    labels = np.arange(1000) % 10
    ref = labels.copy()
    ref[:100] = (ref[:100] + 1) % 10           # fp32: 90% accurate
    assert b.score(pred=ref, ref=ref, labels=labels) == 1.0
    churn = ref.copy()
    churn[100:104] = (churn[100:104] + 1) % 10  # 4 correct answers changed: 99.6% agreement, -0.4 points
    assert b.score(pred=churn, ref=ref, labels=labels) < 0  # within the test gate, but not within half of it
    small = ref.copy()
    small[100:102] = (small[100:102] + 1) % 10  # -0.2 points, 99.8% agreement: within half of both budgets
    assert b.score(pred=small, ref=ref, labels=labels) >= 0
    # answers that churn without changing accuracy: 3 right->wrong and 3 wrong->right = 99.4% agreement
    swap = ref.copy()
    swap[100:103] = (swap[100:103] + 1) % 10
    swap[:3] = labels[:3]
    assert (swap == labels).mean() == (ref == labels).mean()
    assert b.score(pred=swap, ref=ref, labels=labels) < 0  # the net accuracy gate alone would pass this


def test_budget_score_accepts_a_graph_exactly_on_the_threshold():
    b = Budget(max_drop=0.5, min_agreement=0.99, margin=0.7)  # 99.3% agreement on validation
    labels = np.zeros(2000, dtype=int)
    pred = labels.copy()
    pred[:14] = 1  # 1986 of 2000 agree: exactly 99.3%, and 0.7 points lost: over the accuracy budget
    assert b.score(pred=pred, ref=labels, labels=labels) < 0
    b = Budget(max_drop=5, min_agreement=0.99, margin=0.7)
    assert b.score(pred=pred, ref=labels, labels=labels) == 0.0  # on the agreement threshold: kept
    pred[14] = 1
    assert b.score(pred=pred, ref=labels, labels=labels) < 0


def test_the_int8_gate_checks_agreement_as_well_as_accuracy():
    result = {"max_rel_diff": 1.0, "top1_agreement": 0.985, "accuracy": 0.90}
    out = problems("int8", result, reference_accuracy=0.90, max_drop=0.5)
    assert any("agreement" in p for p in out)
    assert problems("int8", {**result, "top1_agreement": 0.995}, reference_accuracy=0.90, max_drop=0.5) == []
    # speed-only INT8 of random weights on random images (no labels): no agreement rule
    assert problems("int8", {**result, "accuracy": None}, reference_accuracy=None, max_drop=0.5) == []


@pytest.mark.parametrize("margin", ["0", "1.5", "-0.2"])
def test_val_margin_outside_zero_to_one_is_one_clear_line(checkpoint, image_folder, tmp_path, margin):
    from export.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--formats", "openvino-int8",
              "--data", str(image_folder / "test"), "--val-margin", margin])
    assert str(e.value).startswith("error: --val-margin must be in (0, 1]")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_held_out_rebuilds_the_runs_validation_split_and_calibrates_without_it(checkpoint, image_folder):
    spec, _, ckpt = load_checkpoint(checkpoint)
    cfg = ckpt["config"]
    split = held_out(checkpoint_config=cfg, class_names=spec.class_names, calib_images=10_000,
                     selection=ckpt["selection"])  # its digest: the very images that chose best.pt
    classes, paths, labels = scan_image_folder(image_folder / "train")
    _, held = stratified_split(labels, cfg["val_fraction"], seed=cfg["seed"])
    assert sorted(split.val_paths) == sorted(paths[i] for i in held)  # exactly the images that chose best.pt
    assert not set(split.val_paths) & set(split.calib_paths)
    assert len(split.calib_paths) == len(paths) - len(held)
    assert all(os.sep + "test" + os.sep not in p for p in split.val_paths + split.calib_paths)
    assert "validation split" in split.val_source


def test_held_out_refuses_overlap_and_names_what_is_missing(checkpoint, image_folder):
    spec, _, ckpt = load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="also calibration images"):
        held_out(checkpoint_config=ckpt["config"], class_names=spec.class_names,
                 val_data=str(image_folder / "test"), calib_data=str(image_folder / "test"))
    with pytest.raises(ValueError, match="--val-data"):
        held_out(checkpoint_config={"data": "/nonexistent"}, class_names=spec.class_names)


def test_calibration_folders_skip_hidden_files_and_folders_as_training_does(checkpoint, image_folder, tmp_path):
    """A macOS ``._photo.jpg`` (AppleDouble metadata) or a notebook's ``.ipynb_checkpoints`` copy is not an image
    of the data set: training skips them, and so do the INT8 calibration folder (--calib-data) and
    ``load_calibration`` (rglob over every suffix took them)."""
    import shutil

    from export.image_sets import load_calibration
    spec, _, ckpt = load_checkpoint(checkpoint)
    calib = tmp_path / "calib"
    shutil.copytree(image_folder / "train", calib)
    real = sorted(str(p) for p in calib.rglob("*.png"))
    (calib / "circle" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata, not a PNG")
    (calib / ".ipynb_checkpoints").mkdir()
    shutil.copy(real[0], calib / ".ipynb_checkpoints" / "copy.png")
    split = held_out(checkpoint_config=ckpt["config"], class_names=spec.class_names,
                     val_data=str(image_folder / "test"), calib_data=str(calib), calib_images=10_000)
    assert sorted(split.calib_paths) == real
    assert len(load_calibration(str(calib), spec, count=10_000)) == len(real)


def test_int8_entries_record_the_accuracy_control(export_manifest, export_dir):
    for name in ("openvino-int8", "onnx-int8"):
        info = export_manifest["variants"][name]["int8"]
        assert info["layers"] > 0 and isinstance(info["kept_fp32"], list)
        v = info["validation"]
        assert v["score"] >= 0 and v["images"] > 0
        assert v["top1_agreement"] >= 1 - (1 - info["budget"]["min_agreement"]) * info["budget"]["margin"] - 1e-9
    kept, layers = kept_layers_onnx(str(export_dir / "model_int8.onnx"))
    assert kept == export_manifest["variants"]["onnx-int8"]["int8"]["kept_fp32"] and layers > len(kept)


def test_the_attention_gates_stay_fp32_from_the_start(export_manifest, export_dir):
    """Every convolution of an attention gate (channel/spatial attention: ``attn`` in the node name) is in the
    ignored scope NNCF got, and is fp32 in the written OpenVINO and ONNX INT8 graphs, and no quantizer follows a
    gate's sigmoid; the stem and the classifier are fp32 too. (The scopes once matched no layer: nothing said
    so, and the gates ran in INT8.)"""
    import openvino as ov

    from export.int8 import QUANTIZABLE_OV

    graph = ov.Core().read_model(str(export_dir / "model_ov_int8.xml"))
    weighted = [op.get_friendly_name() for op in graph.get_ordered_ops() if op.get_type_name() in QUANTIZABLE_OV]
    gates = [n for n in weighted if "/attn/" in n]
    assert gates and export_manifest["arch"] == "cbam_resnet"
    info = export_manifest["variants"]["openvino-int8"]["int8"]
    assert set(gates) | {weighted[0], weighted[-1]} <= set(info["ignored_scope"]) & set(info["kept_fp32"])
    # the gates whole: no quantizer on a gate's sigmoid, whose output scales the feature maps
    sigmoids = [op for op in graph.get_ordered_ops() if op.get_type_name() == "Sigmoid" and "/attn/" in op.get_friendly_name()]
    assert sigmoids and not [op.get_friendly_name() for op in sigmoids for out in op.outputs()
                             for use in out.get_target_inputs() if use.get_node().get_type_name() == "FakeQuantize"]
    assert set(info["kept_fp32"]) == set(kept_layers(str(export_dir / "model_ov_int8.xml")))
    onnx_kept = set(kept_layers(str(export_dir / "model_int8.onnx")))
    assert {n.removesuffix("/WithoutBiases") for n in gates} <= onnx_kept


def test_a_scope_that_names_no_layer_is_an_error_not_a_silent_int8_layer():
    layers = ["/model/stem/stem.0/Conv/WithoutBiases", "/model/stages/stages.0/stages.0.0/attn/channel/fc1/Conv"]
    assert resolve_scopes([r"/model/(?:stages)/(?:stages\.0|0)/(?:stages\.0\.0|0)/(?:stages\.0\.0\.attn|attn)/.*"],
                          layers) == layers[1:]
    with pytest.raises(ValueError, match=r"^1 attention scope\(s\) match no weighted layer of the graph \(first: "
                                         r"/model/stages\\\.0\\\.0\\\.attn/\.\*"):
        resolve_scopes([r"/model/stages\.0\.0\.attn/.*"], layers)


@pytest.mark.slow
def test_accuracy_control_keeps_layers_in_fp32_where_int8_breaks_the_budget(random_checkpoint, image_folder,
                                                                            tmp_path, capsys, monkeypatch):
    """Random weights give near-uniform logits whose top-1 INT8 noise flips once the attention gates are INT8
    too (here they are not kept fp32 from the start: with them fp32 this model's INT8 agrees on every image, and
    nothing would be left to control): INT8 breaks the agreement budget, so the accuracy control must revert
    layers to fp32 while the validation images disagree. Whether the result then passes the test gate is up
    to the test images: a refused variant is named and not written."""
    import re

    import export.exporter
    from export.__main__ import main

    monkeypatch.setattr(export.exporter, "attention_scopes", lambda model: [])
    from tests.conftest import CLASSES, encode, pattern_image

    # validation images of their own, as many as the test split's (the CLI refuses the test images, or a copy of
    # them, as --val-data: tuning on the final report's images)
    val = tmp_path / "val"
    for c in CLASSES:
        (val / c).mkdir(parents=True)
        for i in range(30):
            (val / c / f"{i:03d}.png").write_bytes(encode(pattern_image(c, seed=5000 + i * 7 + len(c))))
    rc = main(["--checkpoint", str(random_checkpoint), "--out", str(tmp_path / "ex"), "--formats",
               "openvino-int8,onnx-int8", "--data", str(image_folder / "test"), "--val-data", str(val),
               "--calib-data", str(image_folder / "train"), "--max-drop", "100", "--min-agreement", "0.98"])
    out = capsys.readouterr()
    line = re.search(r"^openvino-int8: (\d+) of (\d+) layers in INT8, kept in fp32: (.*); (validation .*)$", out.out, re.M)
    assert line, out.out[-3000:]
    kept = line.group(3).split(", ")
    reverted = [n for n in kept if "/stem/" not in n and "/fc/" not in n]  # the first and last layers: from the start
    assert reverted, f"the budget held without reverting any layer: the test shows nothing ({line.group(4)})"
    assert "speed against its fp32 graph" in out.out and "on 1 thread (per core:" in out.out
    manifest = json.loads((tmp_path / "ex" / "export.json").read_text()) if (tmp_path / "ex" / "export.json").exists() \
        else {"variants": {}}
    for name in ("openvino-int8", "onnx-int8"):
        if name in manifest["variants"]:
            assert manifest["variants"][name]["int8"]["validation"]["score"] >= 0
        else:  # refused by the test gate: named, not written
            assert rc == 3 and name in out.err
    if "openvino-int8" in manifest["variants"]:
        assert manifest["variants"]["openvino-int8"]["int8"]["kept_fp32"] == kept


def test_max_reverts_below_one_is_one_clear_line(checkpoint, image_folder, tmp_path):
    from export.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--formats", "openvino-int8",
              "--data", str(image_folder / "test"), "--max-reverts", "0"])
    assert str(e.value) == "error: --max-reverts must be at least 1, got 0"
    assert not (tmp_path / "out").exists()


def test_max_reverts_is_nncfs_iteration_bound(checkpoint, image_folder, tmp_path, monkeypatch):
    """--max-reverts reaches NNCF's accuracy restorer; a failure inside it leaves nothing written."""
    import nncf

    from export.__main__ import main

    seen = {}

    def stop(*args, advanced_accuracy_restorer_parameters, **kwargs):
        seen["iterations"] = advanced_accuracy_restorer_parameters.max_num_iterations
        raise RuntimeError("stopped inside the accuracy control")

    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", stop)
    with pytest.raises(RuntimeError, match="stopped inside"):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--formats", "openvino-int8",
              "--data", str(image_folder / "test"), "--max-reverts", "3", "--min-agreement", "0.98"])
    assert seen == {"iterations": 3}
    assert not (tmp_path / "out" / "export.json").exists()
