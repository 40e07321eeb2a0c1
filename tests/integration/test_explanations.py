"""Explanations (occlusion maps, inference/explain.py): the handler driven with TorchServe's own Context, then a
real TorchServe answering ``POST /explanations/NAME`` and KServe v1 ``POST /v1/models/NAME:explain`` for an
ONNX and an OpenVINO archive, compared with the same computation on the eager model."""
import base64
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import requests
from PIL import Image
from ts.context import Context, RequestProcessor

from export.archive import build_archive, model_config
from handlers.classifier_handler import ImageClassifierHandler
from inference.explain import occlusion
from inference.images import decode_rgb
from inference.transforms import EvalPreset, normalize
from tests.conftest import encode, pattern_image
from tests.integration.conftest import BATCH_DELAY_MS
from tools.torchserve import TorchServe
from training.checkpoint import load_model

IMAGES = [encode(pattern_image("circle", size=30, seed=21)),
          encode(pattern_image("vertical", size=36, seed=22), "JPEG", quality=90)]
B64 = [base64.b64encode(d).decode() for d in IMAGES]
GRID = 7  # HandlerSettings' default


@pytest.fixture(scope="module")
def eager_maps(checkpoint):
    """What ``python -m training explain`` computes for each image: (top-1 index, probability, grid)."""
    spec, model = load_model(checkpoint)
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    canvas = preset.batch([decode_rgb(d, min_side=preset.min_decode_side) for d in IMAGES])
    ref = occlusion(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), canvas, grid=GRID)
    return spec, [(int(i), float(p), m.tolist()) for i, p, m in zip(ref.indices, ref.probabilities, ref.maps)]


def _check(body, ref, spec, *, tol=1e-3):
    index, probability, grid = ref
    assert body["index"] == index and body["class"] == spec.class_names[index] and body["method"] == "occlusion"
    assert body["probability"] == pytest.approx(probability, abs=tol)
    assert body["grid_size"] == GRID and len(body["grid"]) == GRID
    for row, ref_row in zip(body["grid"], grid):
        assert row == pytest.approx(ref_row, abs=tol)


def _png_size(b64: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.size


# -- the handler with TorchServe's Context: routes mixed in one batch -------------------------------------------
@pytest.fixture(scope="module")
def model_dir(export_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("explain_model_dir")
    for f in ("model.onnx", "model.pt", "model_tta.onnx", "model_topk.onnx", "index_to_name.json"):
        shutil.copy(export_dir / f, d)
    return d


def _handler(model_dir, serialized, headers, **graph):
    cfg = model_config(input_size=24, resize_size=26, batch_size=4, tta="flip", topk=2, **graph)
    manifest = {"model": {"modelName": "shapes", "modelVersion": "1.0", "serializedFile": serialized}}
    ctx = Context("shapes", str(model_dir), manifest, 4, None, "0.12.0", model_yaml_config=cfg)
    ctx.request_processor = [RequestProcessor(h) for h in headers]
    ctx.metrics = mock.MagicMock()
    handler = ImageClassifierHandler()
    handler.initialize(ctx)
    return handler, ctx


def test_one_batch_mixing_predictions_and_explanations_answers_each_on_its_route(model_dir, eager_maps):
    spec, refs = eager_maps
    # request 0 is a prediction: TorchServe's BaseHandler looks only there, the handler looks at each request
    headers = [{"explain": "False"}, {"explain": "True"}, {"explain": "True"},
               {"explain": "True", "X-Explain-Overlay": "true"}]
    rows = [{"body": bytearray(IMAGES[0])}, {"body": bytearray(IMAGES[1])}, {"body": bytearray(b"garbage")},
            {"body": {"instances": [{"data": B64[0]}, {"b64": B64[1]}]}}]
    handler, ctx = _handler(model_dir, "model.onnx", headers)
    out = handler.handle(rows, ctx)
    prediction, explained, bad, v1 = (json.loads(o) for o in out)
    assert [ctx.get_response_status(i)[0] for i in range(4)] == [200, 200, 400, 200]
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(4))
    assert len(prediction["predictions"]) == 2 and prediction["tta"] == "flip"
    _check(explained, refs[1], spec)
    assert "overlay_png_base64" not in explained
    assert bad["error"] == "bad image" and bad["code"] == 400
    assert [_png_size(e["overlay_png_base64"]) for e in v1["explanations"]] == [(24, 24), (24, 24)]
    for body, ref in zip(v1["explanations"], refs):
        _check(body, ref, spec)


def test_a_torchscript_archive_is_explained_like_the_eager_model(model_dir, eager_maps):
    spec, refs = eager_maps
    handler, ctx = _handler(model_dir, "model.pt", [{"explain": "True"}])
    body = json.loads(handler.handle([{"body": {"data": B64}}], ctx)[0])
    assert ctx.get_response_status(0)[0] == 200 and len(body) == 2
    for one, ref in zip(body, refs):
        _check(one, ref, spec)


def test_a_probabilities_graph_is_explained_and_a_topk_graph_answers_501(model_dir):
    handler, ctx = _handler(model_dir, "model_tta.onnx", [{"explain": "True"}], graph_output="probabilities",
                            graph_tta="flip")
    body = json.loads(handler.handle([{"body": bytearray(IMAGES[0])}], ctx)[0])
    assert ctx.get_response_status(0)[0] == 200 and len(body["grid"]) == GRID and 0 < body["probability"] <= 1
    handler, ctx = _handler(model_dir, "model_topk.onnx", [{"explain": "True"}, {"explain": "False"}],
                            graph_output="topk", graph_topk=2)
    refused, predicted = (json.loads(o) for o in handler.handle([{"body": bytearray(IMAGES[0])}] * 2, ctx))
    assert ctx.get_response_status(0)[0] == 501 and refused["error"] == "not implemented"
    assert "cannot be explained" in refused["detail"]
    assert ctx.get_response_status(1)[0] == 200 and len(predicted["predictions"]) == 2


# -- a real TorchServe --------------------------------------------------------------------------------------------
SERVED = {"ex_onnx": "onnx", "ex_ov": "openvino", "ex_topk": "onnx-topk"}


@pytest.fixture(scope="module")
def explain_server(export_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("explain_store")
    for name, variant in SERVED.items():  # openvino in f32: its numbers compare with the eager model's
        build_archive(export_dir, variant=variant, name=name, model_store=store, batch_size=8,
                      max_batch_delay=BATCH_DELAY_MS, topk=2, tta="flip", openvino_precision="f32")
    ts = TorchServe(model_store=store, models=",".join(f"{n}={n}.mar" for n in SERVED))
    ts.start(timeout=180)
    pid = ts.pid
    yield ts
    ts.close()
    with pytest.raises(ProcessLookupError):  # stopped by PID
        os.kill(pid, 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ex_onnx", "ex_ov"])
def test_explanations_and_kserve_explain_answer_for_onnx_and_openvino(explain_server, eager_maps, name):
    spec, refs = eager_maps
    url = explain_server.url
    for data, ctype, ref in zip(IMAGES, ("image/png", "image/jpeg"), refs):
        r = requests.post(f"{url}/explanations/{name}", data=data, headers={"Content-Type": ctype}, timeout=60)
        assert r.status_code == 200, r.text
        _check(r.json(), ref, spec)
        assert "overlay_png_base64" not in r.json()
    r = requests.post(f"{url}/explanations/{name}", json={"data": B64[0], "overlay": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert _png_size(r.json()["overlay_png_base64"]) == (spec.input_size, spec.input_size)
    r = requests.post(f"{url}/v1/models/{name}:explain", json={"instances": [{"data": B64[0]}, B64[1]]},
                      headers={"X-Explain-Overlay": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    assert list(r.json()) == ["explanations"] and len(r.json()["explanations"]) == 2
    for body, ref in zip(r.json()["explanations"], refs):
        _check(body, ref, spec)
        assert _png_size(body["overlay_png_base64"]) == (spec.input_size, spec.input_size)
    # the same model still predicts on its prediction routes
    r = requests.post(f"{url}/v1/models/{name}:predict", json={"instances": [B64[0]]}, timeout=60)
    assert r.status_code == 200 and r.json()["predictions"][0]["predictions"][0]["index"] == refs[0][0]


@pytest.mark.slow
def test_a_bad_image_gets_its_own_4xx_json_while_neighbours_are_answered(explain_server, eager_maps):
    spec, refs = eager_maps
    url = explain_server.url
    jobs = [("post", f"{url}/explanations/ex_onnx", {"data": b"not an image at all",
                                                     "headers": {"Content-Type": "image/png"}}),
            ("post", f"{url}/v1/models/ex_ov:explain", {"json": {"instances": [{"data": "%%% not base64"}]}}),
            ("post", f"{url}/explanations/ex_onnx", {"data": IMAGES[0], "headers": {"Content-Type": "image/png"}}),
            ("post", f"{url}/predictions/ex_onnx", {"data": IMAGES[1], "headers": {"Content-Type": "image/jpeg"}}),
            ("post", f"{url}/explanations/ex_onnx", {"json": {"data": B64[0]},
                                                     "headers": {"X-Explain-Overlay": "perhaps"}})]
    with ThreadPoolExecutor(len(jobs)) as pool:  # sent together: one batch window on this server
        bad, bad_v1, good, predicted, bad_option = pool.map(
            lambda j: requests.request(j[0], j[1], timeout=60, **j[2]), jobs)
    assert bad.status_code == 400 and bad.json()["error"] == "bad image" and "not an image" in bad.json()["detail"]
    assert bad_v1.status_code == 400 and bad_v1.json()["error"] == "bad base64"
    assert bad_option.status_code == 400 and "X-Explain-Overlay must be true or false" in bad_option.json()["detail"]
    assert good.status_code == 200, good.text
    _check(good.json(), refs[0], spec)
    assert predicted.status_code == 200 and "predictions" in predicted.json()


@pytest.mark.slow
def test_a_topk_graph_answers_501_on_both_explanation_routes(explain_server):
    url = explain_server.url
    r = requests.post(f"{url}/explanations/ex_topk", data=IMAGES[0], headers={"Content-Type": "image/png"},
                      timeout=60)
    assert r.status_code == 501 and r.json()["error"] == "not implemented" and r.json()["code"] == 501
    r = requests.post(f"{url}/v1/models/ex_topk:explain", json={"instances": [B64[0]]}, timeout=60)
    assert r.status_code == 501 and "cannot be explained" in r.json()["detail"]
    r = requests.post(f"{url}/predictions/ex_topk", data=IMAGES[0], headers={"Content-Type": "image/png"},
                      timeout=60)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
