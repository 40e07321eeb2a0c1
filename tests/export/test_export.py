import json
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from export.archive import build_archive
from export.verify import FP32_RTOL, check
from export.wrappers import FusedNormalization
from handlers.backends import load_backend
from tests.conftest import REPO
from training.checkpoint import load_model
from training.presets import normalize


def test_fused_normalization_equals_explicit_normalization(checkpoint):
    spec, model = load_model(checkpoint)
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    with torch.no_grad():
        fused = FusedNormalization(model, mean=spec.mean, std=spec.std)(x)
        plain = model(normalize(x, mean=spec.mean, std=spec.std))
    assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-5)


def test_export_writes_both_graphs_with_parity_on_real_images(export_dir, export_manifest):
    assert (export_dir / "model.pt").is_file() and (export_dir / "model.onnx").is_file()
    parity = export_manifest["parity"]
    for fmt in ("torchscript", "onnx"):
        print(fmt, parity[fmt])
        assert parity[fmt]["images"] == 24
        assert parity[fmt]["max_rel_diff"] < FP32_RTOL
        assert parity[fmt]["max_abs_diff"] < 1e-4
        assert parity[fmt]["top1_agreement"] == 1.0
    assert json.loads((export_dir / "index_to_name.json").read_text()) == {"0": "circle", "1": "horizontal",
                                                                           "2": "vertical"}


def test_onnx_graph_takes_uint8_images_with_dynamic_batch(export_dir, checkpoint):
    model = onnx.load(export_dir / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    spec, eager = load_model(checkpoint)
    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randint(0, 256, (n, 3, 24, 24), dtype=torch.uint8)
        (logits,) = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = eager(normalize(x, mean=spec.mean, std=spec.std)).numpy()
        assert logits.shape == (n, 3)
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)


def test_torchscript_graph_is_frozen_and_takes_uint8(export_dir):
    backend = load_backend(str(export_dir / "model.pt"))
    out = backend(torch.zeros(2, 3, 24, 24, dtype=torch.uint8))
    assert out.shape == (2, 3) and out.dtype == torch.float32
    graph = str(backend.module.graph)
    assert "aten::batch_norm" not in graph  # folded into the convolutions by freezing


def test_parity_check_rejects_a_disagreeing_graph():
    bad = {"onnx": {"max_rel_diff": 0.1, "top1_agreement": 0.9}}
    with pytest.raises(AssertionError, match="disagree"):
        check(bad)


def test_unknown_format_is_refused(checkpoint, tmp_path):
    from export.__main__ import main
    with pytest.raises(SystemExit, match="unknown tensorrt"):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--formats", "onnx,tensorrt"])


@pytest.mark.parametrize("fmt,graph", [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_archive_is_self_contained(export_dir, tmp_path, fmt, graph):
    mar = build_archive(export_dir, fmt=fmt, name="shapes", version="2.0", model_store=tmp_path, topk=2, tta="flip",
                        batch_size=4, max_batch_delay_ms=50)
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
        card = json.loads(z.read("model_card.json"))
    assert {graph, "classifier_handler.py", "backends.py", "pipeline.py", "presets.py", "images.py",
            "class_index.py", "tta.py", "index_to_name.json", "model_card.json", "model-config.yaml"} <= names
    assert manifest["model"]["modelName"] == "shapes" and manifest["model"]["modelVersion"] == "2.0"
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 50
    assert config["handler"] == {"topk": 2, "tta": "flip", "max_pixels": 40_000_000, "threads": 0,
                                 "input_size": 24, "resize_size": 26}
    assert card["format"] == fmt and card["class_names"] == ["circle", "horizontal", "vertical"]


def test_archive_cli_reports_a_missing_export(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export", "archive", "--dir", str(tmp_path), "--name", "x",
                           "--model-store", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "run `python -m export --checkpoint" in proc.stderr


def test_help_explains_the_options():
    out = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    assert "uint8" in out and "--formats" in out and "BatchNorm" in out
