"""The TorchServe handler class driven directly, with TorchServe's own Context object."""
import json
import shutil

import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor

from export.archive import HANDLER, HELPERS, model_config
from handlers.classifier_handler import ImageClassifierHandler
from tests.conftest import encode, pattern_image
from training.checkpoint import load_model
from training.images import decode_rgb
from training.presets import EvalPreset, normalize
from training.tta import predict_proba


def make_context(model_dir, *, tta="flip", topk=2, headers=None, n=1):
    cfg = model_config(input_size=24, resize_size=26, tta=tta, topk=topk, batch_size=4)
    manifest = {"model": {"modelName": "shapes", "modelVersion": "1.0", "serializedFile": "model.onnx"}}
    ctx = Context("shapes", str(model_dir), manifest, 4, None, "0.12.0", model_yaml_config=cfg)
    ctx.request_processor = [RequestProcessor((headers or [{}] * n)[i]) for i in range(n)]
    return ctx


@pytest.fixture(scope="module")
def model_dir(export_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("model_dir")
    for f in ("model.onnx", "index_to_name.json"):
        shutil.copy(export_dir / f, d)
    return d


def run(handler, ctx, rows):
    handler.context = ctx
    return handler.postprocess(handler.inference(handler.preprocess(rows)))


def test_batch_with_a_bad_image_answers_each_request(model_dir, checkpoint):
    handler = ImageClassifierHandler()
    handler.initialize(make_context(model_dir))
    images = [encode(pattern_image(k, size=30, seed=s)) for k, s in (("circle", 1), ("vertical", 2))]
    rows = [{"body": bytearray(images[0])}, {"body": bytearray(b"garbage bytes")}, {"data": images[1]}]
    ctx = make_context(model_dir, n=3, headers=[{"X-Top-K": "3"}, {}, {"x-top-k": "1"}])
    out = run(handler, ctx, rows)
    assert ctx.get_response_status(1)[0] == 400
    assert json.loads(out[1])["error"] == "bad image" and "not an image" in json.loads(out[1])["detail"]
    for i in range(3):
        assert ctx.get_response_content_type(i) == "application/json"
    first, third = json.loads(out[0]), json.loads(out[2])
    assert len(first["predictions"]) == 3 and len(third["predictions"]) == 1
    assert first["tta"] == "flip" and first["model"] == "shapes" and first["version"] == "1.0"
    # The served probabilities equal eager flip-TTA on the same decode + eval preset.
    spec, model = load_model(checkpoint)
    batch = EvalPreset(crop_size=24, resize_size=26).batch([decode_rgb(b) for b in images])
    with torch.no_grad():
        ref = predict_proba(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), batch, "flip")
    for body, row in ((first, ref[0]), (third, ref[1])):
        top = body["predictions"][0]
        assert top["index"] == int(row.argmax()) and top["confidence"] == pytest.approx(row.max().item(), abs=1e-5)
        assert top["class"] == spec.class_names[top["index"]]


def test_bad_topk_and_bomb_get_their_own_status(model_dir):
    import io
    from PIL import Image
    handler = ImageClassifierHandler()
    handler.initialize(make_context(model_dir, tta="none"))
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    good = bytearray(encode(pattern_image("circle")))
    ctx = make_context(model_dir, n=3, headers=[{"X-Top-K": "0"}, {}, {}])
    out = run(handler, ctx, [{"body": good}, {"body": bytearray(bomb.getvalue())}, {"body": good}])
    assert ctx.get_response_status(0)[0] == 400 and "X-Top-K" in json.loads(out[0])["detail"]
    assert ctx.get_response_status(1)[0] == 413 and json.loads(out[1])["error"] == "image too large"
    assert json.loads(out[2])["tta"] == "none" and len(json.loads(out[2])["predictions"]) == 2


def test_all_bad_batch_runs_no_forward(model_dir):
    handler = ImageClassifierHandler()
    handler.initialize(make_context(model_dir))
    ctx = make_context(model_dir, n=2)
    out = run(handler, ctx, [{"body": bytearray()}, {"body": "text"}])
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [400, 415]
    assert all("error" in json.loads(o) for o in out)


def test_invalid_tta_in_config_fails_initialize(model_dir):
    ctx = make_context(model_dir)
    ctx.model_yaml_config["handler"]["tta"] = "rotate"
    with pytest.raises(ValueError, match="handler.tta"):
        ImageClassifierHandler().initialize(ctx)
