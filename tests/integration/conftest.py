"""One real TorchServe for the integration tests, serving freshly built archives."""
import os

import pytest
import torch

from export.archive import build_archive
from inference.images import decode_rgb
from inference.transforms import EvalPreset, normalize
from inference.tta import predict_proba
from tools.torchserve import TorchServe
from training.checkpoint import load_model

BATCH_DELAY_MS = 300  # long enough that requests sent together land in one batch

SERVED = {"shapes": "onnx", "shapes_ts": "torchscript", "shapes_ov8": "openvino-int8",
          "shapes_tta": "onnx-tta", "shapes_topk": "onnx-topk"}
ADAPTIVE = "shapes_adaptive"  # the onnx graph with adaptive ten-crop TTA in the handler
ADAPTIVE_THRESHOLD = 0.85     # the test model's plain confidences on test_torchserve's images lie on both sides


@pytest.fixture(scope="module")  # one server at a time: see tools/torchserve.py
def server(export_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("model_store")
    for name, variant in SERVED.items():
        build_archive(export_dir, variant=variant, name=name, model_store=store, batch_size=8,
                      max_batch_delay=BATCH_DELAY_MS, topk=2, tta="flip")
    build_archive(export_dir, variant="onnx", name=ADAPTIVE, model_store=store, batch_size=8,
                  max_batch_delay=BATCH_DELAY_MS, topk=2, tta="ten_crop", adaptive_tta=True,
                  adaptive_threshold=ADAPTIVE_THRESHOLD)
    # Version 2.0 of "shapes" (the TorchScript graph) sits in the store, registered later over HTTP.
    build_archive(export_dir, variant="torchscript", name="shapes", version="2.0", file_name="shapes_v2",
                  model_store=store, topk=2, tta="none")
    ts = TorchServe(model_store=store, models=",".join(f"{n}={n}.mar" for n in [*SERVED, ADAPTIVE]),
                    overrides={"enable_model_api": "true"})
    ts.start(timeout=180)
    pid = ts.pid
    yield ts
    ts.close()  # stopped by PID, and its temporary folder removed
    with pytest.raises(ProcessLookupError):  # stopped by PID: the Java process is gone
        os.kill(pid, 0)


@pytest.fixture(scope="module")
def eager(checkpoint):
    spec, model = load_model(checkpoint)
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)

    def probs(payloads, tta="flip"):
        batch = preset.batch([decode_rgb(p, min_side=preset.min_decode_side) for p in payloads])  # as offline
        with torch.no_grad():
            return predict_proba(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), batch, tta)
    return spec, probs


