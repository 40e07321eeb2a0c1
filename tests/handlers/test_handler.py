"""The TorchServe handler class driven directly, with TorchServe's own Context object."""
import base64
import io
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor

from export.archive import model_config
from handlers.classifier_handler import ImageClassifierHandler
from inference.images import decode_rgb
from inference.transforms import EvalPreset, normalize
from inference.tta import canvas_preset, predict_proba
from tests.conftest import encode, pattern_image
from training.checkpoint import load_model


def make_context(model_dir, *, n=1, headers=None, serialized="model.onnx", **handler):
    cfg = model_config(input_size=24, resize_size=26, **{"batch_size": 4, "tta": "flip", "topk": 2, **handler})
    manifest = {"model": {"modelName": "shapes", "modelVersion": "1.0", "serializedFile": serialized}}
    # TorchServe passes the batch size it batches with (the archive's batchSize, or the registration's)
    ctx = Context("shapes", str(model_dir), manifest, cfg["batchSize"], None, "0.12.0", model_yaml_config=cfg)
    ctx.request_processor = [RequestProcessor((headers or [{}] * n)[i]) for i in range(n)]
    return ctx


@pytest.fixture(scope="module")
def model_dir(export_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("model_dir")
    for f in ("model.onnx", "model.pt", "model_tta.onnx", "index_to_name.json"):
        shutil.copy(export_dir / f, d)
    return d


@pytest.fixture(scope="module")
def eager(checkpoint):
    spec, model = load_model(checkpoint)

    def probs(payloads, tta="flip", **options):  # options: predict_proba's scales / how
        canvas = canvas_preset(tta, crop_size=24, resize_size=26).batch([decode_rgb(p) for p in payloads])
        with torch.no_grad():
            return predict_proba(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), canvas, tta,
                                 crop_size=24, **options)
    return spec, probs


def handler_for(model_dir, **cfg):
    h = ImageClassifierHandler()
    h.initialize(make_context(model_dir, **cfg))
    return h


def run(handler, ctx, rows):
    handler.context = ctx
    return handler.postprocess(handler.inference(handler.preprocess(rows)))


IMAGES = [encode(pattern_image(k, size=30, seed=s)) for k, s in (("circle", 1), ("vertical", 2), ("horizontal", 3))]


def test_batch_with_a_bad_image_answers_each_request(model_dir, eager):
    spec, probs = eager
    handler = handler_for(model_dir)
    rows = [{"body": bytearray(IMAGES[0])}, {"body": bytearray(b"garbage bytes")}, {"data": IMAGES[1]}]
    ctx = make_context(model_dir, n=3, headers=[{"X-Top-K": "3"}, {}, {"x-top-k": "1"}])
    out = run(handler, ctx, rows)
    assert ctx.get_response_status(1)[0] == 400
    assert json.loads(out[1])["error"] == "bad image" and "not an image" in json.loads(out[1])["detail"]
    for i in range(3):
        assert ctx.get_response_content_type(i) == "application/json"
    first, third = json.loads(out[0]), json.loads(out[2])
    assert len(first["predictions"]) == 3 and len(third["predictions"]) == 1
    assert first["tta"] == "flip" and first["model"] == "shapes" and first["version"] == "1.0"
    ref = probs([IMAGES[0], IMAGES[1]])
    for body, row in ((first, ref[0]), (third, ref[1])):
        top = body["predictions"][0]
        assert top["index"] == int(row.argmax()) and top["confidence"] == pytest.approx(row.max().item(), abs=1e-5)
        assert top["class"] == spec.class_names[top["index"]]


@pytest.mark.parametrize("tta", ["none", "five_crop", "ten_crop", "multi_scale"])
def test_every_tta_mode_equals_offline_evaluation(model_dir, eager, tta):
    _, probs = eager
    handler = handler_for(model_dir, tta=tta, topk=3)
    out = run(handler, make_context(model_dir, n=3), [{"body": bytearray(p)} for p in IMAGES])
    ref = probs(IMAGES, tta)
    for body, row in zip(map(json.loads, out), ref):
        assert body["tta"] == tta
        got = {p["index"]: p["confidence"] for p in body["predictions"]}
        assert got == pytest.approx({i: row[i].item() for i in range(3)}, abs=1e-5)


def test_torchscript_backend_and_mean_logits(model_dir, eager):
    """The TorchScript graph with tta_aggregate: logits answers what offline softmax-of-mean-logits gives,
    which differs from the mean of softmaxes (so a handler ignoring the setting fails here)."""
    _, probs = eager
    # the image whose two flip views the model tells apart most (a symmetric one's aggregations are equal)
    image = max(IMAGES, key=lambda i: (probs([i], how="logits") - probs([i], how="softmax")).abs().max().item())
    handler = handler_for(model_dir, serialized="model.pt", tta="flip", tta_aggregate="logits", topk=3)
    body = json.loads(run(handler, make_context(model_dir), [{"body": bytearray(image)}])[0])
    assert body["tta"] == "flip" and len(body["predictions"]) == 3
    got = {p["index"]: p["confidence"] for p in body["predictions"]}
    by_logits, by_softmax = probs([image], how="logits")[0], probs([image], how="softmax")[0]
    assert got == pytest.approx({i: by_logits[i].item() for i in range(3)}, abs=1e-5)
    assert not torch.allclose(by_logits, by_softmax, atol=1e-4)


def test_multi_scale_follows_the_configured_scales(model_dir, eager):
    _, probs = eager
    handler = handler_for(model_dir, tta="multi_scale", tta_scales=[1.0, 0.8], topk=3)
    body = json.loads(run(handler, make_context(model_dir), [{"body": bytearray(IMAGES[1])}])[0])
    got = {p["index"]: p["confidence"] for p in body["predictions"]}
    assert got == pytest.approx({i: probs(IMAGES[1:2], "multi_scale", scales=(1.0, 0.8))[0][i].item()
                                 for i in range(3)}, abs=1e-5)
    assert got != pytest.approx({i: probs(IMAGES[1:2], "multi_scale")[0][i].item() for i in range(3)}, abs=1e-5)


def test_in_graph_tta_archive_reports_the_graphs_tta(model_dir, eager):
    _, probs = eager
    handler = handler_for(model_dir, serialized="model_tta.onnx", graph_output="probabilities", graph_tta="flip")
    assert handler.tta == "none"  # the graph does the views
    assert (handler.views, handler.metric_views) == (1, 2)  # TTAViewsPerImage reports the graph's 2, not 1
    body = json.loads(run(handler, make_context(model_dir), [{"body": bytearray(IMAGES[2])}])[0])
    assert body["tta"] == "flip"
    assert body["predictions"][0]["confidence"] == pytest.approx(probs([IMAGES[2]]).max().item(), abs=1e-5)


def test_several_images_per_request_get_a_list(model_dir, eager):
    _, probs = eager
    handler = handler_for(model_dir)
    b64 = [base64.b64encode(p).decode() for p in IMAGES]
    rows = [{"body": {"data": b64, "topk": 1}}, {"a": bytearray(IMAGES[0]), "b": bytearray(IMAGES[1])},
            {"body": {"data": [b64[0], "!!"]}}, {"body": [b64[2], base64.b64encode(b"text").decode()]}]
    ctx = make_context(model_dir, n=4)
    out = run(handler, ctx, rows)
    first, second = json.loads(out[0]), json.loads(out[1])
    assert isinstance(first, list) and len(first) == 3 and all(len(b["predictions"]) == 1 for b in first)
    assert [b["predictions"][0]["index"] for b in first] == probs(IMAGES).argmax(1).tolist()
    assert isinstance(second, list) and len(second) == 2
    assert ctx.get_response_status(2)[0] == 400 and "bad base64" in out[2]
    assert ctx.get_response_status(3)[0] == 400 and "image 1 of 2" in json.loads(out[3])["detail"]


def test_adaptive_tta_says_where_it_was_applied(model_dir, eager):
    _, probs = eager
    plain = probs(IMAGES, "none").max(1).values
    low = plain.sort().values
    threshold = ((low[0] + low[1]) / 2).item()  # between two confidences: no image sits on the threshold
    handler = handler_for(model_dir, tta="flip", adaptive_tta=True, adaptive_threshold=threshold, topk=3)
    out = [json.loads(o) for o in run(handler, make_context(model_dir, n=3), [{"body": bytearray(p)} for p in IMAGES])]
    applied = [b["tta_applied"] for b in out]
    assert applied == (plain < threshold).tolist() and any(applied) and not all(applied)
    full, none = probs(IMAGES, "flip"), probs(IMAGES, "none")
    for body, a, f, n in zip(out, applied, full, none):
        assert body["tta"] == ("flip" if a else "none")
        ref = f if a else n
        assert body["predictions"][0]["confidence"] == pytest.approx(ref.max().item(), abs=1e-5)


def test_bad_topk_and_bomb_get_their_own_status(model_dir):
    handler = handler_for(model_dir, tta="none")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    good = bytearray(IMAGES[0])
    ctx = make_context(model_dir, n=4, headers=[{"X-Top-K": "0"}, {}, {}, {}])
    out = run(handler, ctx, [{"body": good}, {"body": bytearray(bomb.getvalue())}, {"body": good},
                             {"body": {"data": base64.b64encode(good).decode(), "topk": 99}}])
    assert ctx.get_response_status(0)[0] == 400 and "X-Top-K" in json.loads(out[0])["detail"]
    assert ctx.get_response_status(1)[0] == 413 and json.loads(out[1])["error"] == "image too large"
    assert json.loads(out[2])["tta"] == "none" and len(json.loads(out[2])["predictions"]) == 2
    assert ctx.get_response_status(3)[0] == 400 and "topk must be between 1 and 3" in out[3]


def test_all_bad_batch_runs_no_forward(model_dir):
    handler = handler_for(model_dir)
    handler.backend = lambda images: pytest.fail("a forward ran for a batch without a single good image")
    ctx = make_context(model_dir, n=2)
    out = run(handler, ctx, [{"body": bytearray()}, {"body": "text"}])
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [400, 415]
    assert all("error" in json.loads(o) for o in out)


def test_a_failing_model_answers_500_for_its_batch_only(model_dir):
    handler = handler_for(model_dir)

    def broken(images):
        raise RuntimeError("simulated out of memory in /opt/build/onnxruntime/core/session.cc:42, node /conv1")
    handler.backend = broken
    ctx = make_context(model_dir, n=2)
    out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, {"body": bytearray(b"junk")}])
    detail = json.loads(out[0])["detail"]
    assert ctx.get_response_status(0)[0] == 500 and "RuntimeError: out of memory" in detail
    assert "/opt/build" not in detail and "conv1" not in detail  # the server's internals stay in its log
    assert ctx.get_response_status(1)[0] == 400  # its own problem, still reported as such


def test_invalid_settings_fail_initialize(model_dir):
    for bad, match in (({"tta": "rotate"}, "handler.tta"), ({"tta_aggregate": "max"}, "tta_aggregate"),
                       ({"graph_output": "boxes"}, "graph_output"), ({"topk": "three"}, "handler.topk must be"),
                       ({"toppk": 3}, "unknown key.*toppk"), ({"input_size": None}, "input_size is required")):
        ctx = make_context(model_dir)
        ctx.model_yaml_config["handler"].update(bad)
        with pytest.raises(ValueError, match=match):
            ImageClassifierHandler().initialize(ctx)


def test_admission_budgets_answer_413_and_503_per_request(model_dir):
    handler = handler_for(model_dir, max_request_pixels=2000, max_batch_pixels=2000)  # the images are 30x30
    ctx = make_context(model_dir, n=4)
    three = {"body": {"data": [base64.b64encode(IMAGES[0]).decode()] * 3}}  # 2700 pixels in one request
    out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, three, {"body": bytearray(IMAGES[1])},
                             {"body": bytearray(IMAGES[2])}])
    assert [ctx.get_response_status(i)[0] for i in range(4)] == [200, 413, 200, 503]
    assert json.loads(out[1])["error"] == "request too large" and "limit per request is 2000" in out[1]
    assert json.loads(out[3])["error"] == "busy" and json.loads(out[2])["predictions"]


def test_the_batch_budget_counts_jpegs_at_their_reduced_size(model_dir):
    """Two 400x300 photos against a 200,000-pixel batch budget: as JPEGs each is decoded reduced to 50x38
    (1/8, for the model's resize to 36) and both are answered; as PNGs (decoded at full size, 120,000 pixels)
    the second gets 503."""
    handler = handler_for(model_dir, max_request_pixels=200_000, max_batch_pixels=200_000)
    assert handler.canvas.min_decode_side <= 37  # 300 // 8
    photo = pattern_image("circle", size=400, seed=5)[:300]  # 400 wide, 300 high
    for fmt, statuses in (("JPEG", [200, 200]), ("PNG", [200, 503])):
        data = encode(photo, fmt)
        ctx = make_context(model_dir, n=2)
        out = run(handler, ctx, [{"body": bytearray(data)}, {"body": bytearray(data)}])
        assert [ctx.get_response_status(i)[0] for i in range(2)] == statuses, (fmt, out)
    # with a batched JPEG decoder (the GPU's nvjpeg: full size; torchvision's CPU decoder stands in) a JPEG
    # costs its full size
    from inference.images import batch_jpeg_decoder
    handler.jpeg_batch_decoder = batch_jpeg_decoder("cpu")
    ctx = make_context(model_dir, n=2)
    data = encode(photo, "JPEG")
    run(handler, ctx, [{"body": bytearray(data)}, {"body": bytearray(data)}])
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 503]


def test_the_gpus_batched_jpeg_path_answers_each_request_as_the_cpu_path_does(model_dir):
    """With a batched JPEG decoder (a GPU's nvjpeg; torchvision's CPU decoder stands in), a batch of PNGs only,
    a cut-off JPEG beside a PNG, and a good JPEG are each answered as without it: a batch with no complete JPEG
    once called the decoder with an empty list, whose ValueError failed every request of the batch."""
    from inference.images import batch_jpeg_decoder
    jpeg = encode(pattern_image("vertical", size=30, seed=7), "JPEG", quality=95)
    cut = encode(pattern_image("circle", size=64, seed=8), "JPEG")[:200]
    batches = [[IMAGES[0], IMAGES[1]], [IMAGES[2], cut], [jpeg, IMAGES[0], cut]]
    answers = {}
    for decoder in (None, batch_jpeg_decoder("cpu")):
        handler = handler_for(model_dir)
        handler.jpeg_batch_decoder = decoder
        for b, payloads in enumerate(batches):
            ctx = make_context(model_dir, n=len(payloads))
            out = run(handler, ctx, [{"body": bytearray(p)} for p in payloads])
            answers.setdefault(b, []).append(([ctx.get_response_status(i)[0] for i in range(len(payloads))],
                                              [json.loads(o) for o in out]))
    for b, ((cpu_status, cpu), (status, batched)) in answers.items():
        assert status == cpu_status, (b, cpu_status, status)
        for k, payload in enumerate(batches[b]):
            if payload in IMAGES or payload is cut:  # PNGs decode alike on both paths; the cut JPEG is a 400 on both
                assert batched[k] == cpu[k], (b, k)
    assert [answers[b][0][0] for b in range(3)] == [[200, 200], [200, 400], [200, 200, 400]]
    assert answers[2][1][1][0]["predictions"][0]["class"] == answers[2][0][1][0]["predictions"][0]["class"]


def test_the_default_batch_budget_grows_with_the_batch_where_jpegs_decode_full_size(model_dir):
    """Unset, max_batch_pixels is 128 MP on the CPU and batchSize x 24 MP on a GPU (nvjpeg's batched
    decoder; torchvision's CPU decoder stands in), where it is more; a configured budget is kept as it is."""
    from inference.images import batch_jpeg_decoder
    ctx = make_context(model_dir, batch_size=16)
    handler = ImageClassifierHandler()
    handler.initialize(ctx)
    assert handler.settings.max_batch_pixels is None and handler.max_batch_pixels == 128_000_000
    handler.jpeg_batch_decoder = batch_jpeg_decoder("cpu")
    assert handler.max_batch_pixels == 16 * 24_000_000
    assert handler_for(model_dir, max_request_pixels=10_000, max_batch_pixels=10_000).max_batch_pixels == 10_000


def test_the_batch_size_is_the_one_torchserve_batches_with(model_dir):
    """A model registered with ?batch_size=16 batches 16 requests whatever its archive's model-config says:
    the warm-up and the GPU batch budget follow TorchServe's number, not the YAML's."""
    ctx = make_context(model_dir)  # the archive says 4
    ctx.system_properties["batch_size"] = 16
    handler = ImageClassifierHandler()
    handler.initialize(ctx)
    assert handler.batch_size == 16


def test_a_failure_of_the_transform_fails_only_the_request_it_comes_from(model_dir):
    handler = handler_for(model_dir)

    class Flaky(EvalPreset):
        def __call__(self, image):
            if image.shape[-1] == 64:
                raise RuntimeError("simulated out of memory while resizing")
            return super().__call__(image)

    handler.canvas = Flaky(crop_size=handler.canvas.crop_size, resize_size=handler.canvas.resize_size)
    ctx = make_context(model_dir, n=2)
    big = encode(pattern_image("circle", size=64, seed=3))
    out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, {"body": bytearray(big)}])
    assert ctx.get_response_status(0)[0] == 200 and json.loads(out[0])["predictions"]
    assert ctx.get_response_status(1)[0] == 500 and "simulated out of memory" in json.loads(out[1])["detail"]
    assert json.loads(out[1])["error"] == "preprocess failed"


def test_a_failure_while_stacking_is_retried_request_by_request(model_dir, monkeypatch):
    handler = handler_for(model_dir)
    stack, calls = torch.stack, []

    def flaky(tensors, *args, **kwargs):
        calls.append(len(tensors))
        if len(tensors) > 1:
            raise RuntimeError("simulated out of memory while stacking")
        return stack(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "stack", flaky)
    ctx = make_context(model_dir, n=2)
    out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, {"body": bytearray(IMAGES[1])}])
    assert calls[:3] == [2, 1, 1], calls  # the batch's stack failed, then each request's own succeeded
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 200]
    assert all(json.loads(o)["predictions"] for o in out)


def test_a_model_failure_is_retried_request_by_request_and_fails_only_the_request_that_fails_alone(model_dir):
    """One request of many images (with flip TTA, twice as many views) is too much for the model (an out of
    memory, simulated above 8 rows): the batch's forward fails, then each request alone; that request gets its
    500, its neighbours their 200 with the answers they get in a batch of their own."""
    handler = handler_for(model_dir, tta="flip")
    alone = {}
    for i in (0, 2):
        ctx = make_context(model_dir, n=1)
        alone[i] = json.loads(run(handler, ctx, [{"body": bytearray(IMAGES[i])}])[0])["predictions"]
    backend, calls = handler.backend, []

    def limited(images):
        calls.append(len(images))
        if len(images) > 8:
            raise RuntimeError("simulated out of memory")
        return backend(images)
    handler.backend = limited
    ctx = make_context(model_dir, n=3)
    many = {"body": {"data": [base64.b64encode(IMAGES[1]).decode()] * 5}}  # 5 images, 10 views
    out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, many, {"body": bytearray(IMAGES[2])}])
    assert calls == [14, 2, 10, 2], calls  # the batch (7 images x 2 views), then request by request
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [200, 500, 200]
    assert json.loads(out[1])["error"] == "inference failed" and "out of memory" in json.loads(out[1])["detail"]
    for i in (0, 2):
        got = json.loads(out[i])["predictions"]
        assert [p["class"] for p in got] == [p["class"] for p in alone[i]]
        assert [p["confidence"] for p in got] == pytest.approx([p["confidence"] for p in alone[i]], abs=1e-6)


def test_an_unsupported_format_is_415(model_dir):
    handler = handler_for(model_dir)
    ctx = make_context(model_dir, n=2)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, "ICO")
    out = run(handler, ctx, [{"body": bytearray(buf.getvalue())}, {"body": bytearray(IMAGES[0])}])
    assert ctx.get_response_status(0)[0] == 415 and json.loads(out[0])["error"] == "unsupported image format"
    assert ctx.get_response_status(1)[0] == 200



def test_openvino_archives_are_unpinned_unless_the_settings_say_so(model_dir, export_dir):
    for f in ("model_ov.xml", "model_ov.bin"):
        shutil.copy(export_dir / f, model_dir)
    for settings, pinned in (({}, False), ({"openvino_cpu_pinning": True}, True)):
        h = handler_for(model_dir, serialized="model_ov.xml", openvino_precision="f32", **settings)
        assert h.backend.compiled.get_property("ENABLE_CPU_PINNING") is pinned
        assert h.backend.providers == ["CPU f32" + (" pinned" if pinned else "")]


def test_a_clients_describe_header_never_answers_its_batch_with_one_model_card(model_dir, eager, tmp_path):
    """TorchServe copies every client header into the request, and BaseHandler.handle answered a batch whose
    request 0 said "describe: True" with ONE model card: TorchServe then failed every request of it (503)."""
    handler = handler_for(model_dir)
    rows = [{"body": bytearray(IMAGES[0])}, {"body": bytearray(IMAGES[1])}]
    metrics = SimpleNamespace(add_time=lambda *a, **k: None, add_metric=lambda *a, **k: None)
    ctx = make_context(model_dir, n=2, headers=[{"describe": "True"}, {}])
    ctx.request_ids, ctx.metrics = {0: "a", 1: "b"}, metrics
    out = handler.handle(rows, ctx)
    assert len(out) == 2 and all("predictions" in json.loads(body) for body in out)
    # the management API's describe (GET /models/NAME?customized=true) asks alone: the model card
    ctx = make_context(model_dir, n=1, headers=[{"describe": "True"}])
    ctx.request_ids, ctx.metrics = {0: "m"}, metrics
    (card,) = handler.handle([{}], ctx)
    assert "has no model_card.json" in json.loads(card)["error"]  # this test's model folder has none


def test_an_answer_over_max_response_bytes_is_that_requests_413_alone(model_dir):
    """TorchServe drops the worker (and answers its whole batch with an error) when one answer is longer than
    its max_response_size: the handler answers that request 413 instead, and its neighbours as usual."""
    handler = handler_for(model_dir, tta="none", max_response_bytes=1024)
    ctx = make_context(model_dir, n=2)
    many = {"body": {"data": [base64.b64encode(IMAGES[0]).decode()] * 8, "topk": 3}}  # 8 x 3 predictions
    out = run(handler, ctx, [many, {"body": bytearray(IMAGES[1])}])
    assert ctx.get_response_status(0)[0] == 413 and json.loads(out[0])["error"] == "answer too large", out[0]
    assert "max_response_bytes (1024)" in json.loads(out[0])["detail"]
    assert ctx.get_response_status(1)[0] == 200 and json.loads(out[1])["predictions"]


def test_an_answer_that_cannot_be_built_fails_its_request_only(model_dir, monkeypatch):
    """A renderer's bug met on one request's results is that request's 500; before, its error object went on
    as the answer body and the size check's len() raised for the whole batch."""
    from inference import protocols
    render = protocols.render

    def flaky(req, results, **kwargs):
        if req.multi:  # the JSON-list request below
            raise KeyError("simulated renderer bug")
        return render(req, results, **kwargs)

    monkeypatch.setattr(protocols, "render", flaky)
    handler = handler_for(model_dir)
    ctx = make_context(model_dir, n=2)
    out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, {"body": [base64.b64encode(IMAGES[1]).decode()]}])
    assert ctx.get_response_status(0)[0] == 200 and json.loads(out[0])["predictions"]
    detail = json.loads(out[1])["detail"]
    assert ctx.get_response_status(1)[0] == 500 and "could not be built" in detail and "simulated" not in detail


def test_a_graph_of_another_class_count_than_its_names_refuses_to_start(model_dir, tmp_path):
    """index_to_name.json of 3 classes beside a graph of the model's 4 (or 5 names): every batch failed, and a
    client's large k made its neighbours' answers 500s too; now the worker does not start, saying why."""
    names = json.loads((model_dir / "index_to_name.json").read_text())
    for count in (len(names) - 1, len(names) + 1):
        d = tmp_path / f"names{count}"
        shutil.copytree(model_dir, d)
        (d / "index_to_name.json").write_text(json.dumps({str(i): f"c{i}" for i in range(count)}))
        with pytest.raises(ValueError, match=rf"returns {len(names)} scores per image but index_to_name.json says "
                                             rf"{count} of {count} classes"):
            handler_for(d)


def test_a_requests_ranking_does_not_depend_on_its_neighbours_k(model_dir):
    """Tied probabilities: torch.topk ordered them by the largest k of the batch, so a neighbour's X-Top-K changed
    which classes this request got; they now rank in index order, whatever the batch."""
    handler = handler_for(model_dir, tta="none")
    classes = len(handler.class_names)
    handler.backend = lambda images: torch.zeros(len(images), classes)  # every class tied

    def answer(neighbour_k):
        ctx = make_context(model_dir, n=2, headers=[{}, {"X-Top-K": str(neighbour_k)}])
        out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, {"body": bytearray(IMAGES[1])}])
        return [p["index"] for p in json.loads(out[0])["predictions"]]
    assert answer(1) == answer(classes) == [0, 1]


def test_non_finite_scores_are_their_requests_500_and_the_others_are_answered(model_dir):
    handler = handler_for(model_dir, tta="none")
    forward = handler.backend

    def overflowing(images):  # the first image's scores overflow, as an fp16 forward can
        out = forward(images)
        out[0, 0] = float("inf")
        return out
    handler.backend = overflowing
    ctx = make_context(model_dir, n=2)
    out = run(handler, ctx, [{"body": bytearray(IMAGES[0])}, {"body": bytearray(IMAGES[1])}])
    assert ctx.get_response_status(0)[0] == 500 and "not finite" in json.loads(out[0])["detail"]
    assert ctx.get_response_status(1)[0] == 200 and len(json.loads(out[1])["predictions"]) == 2
    for body in out:  # strict JSON: no NaN / Infinity constant anywhere
        json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in {body}"))


def test_a_cpu_runtime_on_a_gpu_host_decodes_and_batches_on_the_cpu(model_dir, monkeypatch):
    """TorchServe gives each worker a gpu_id on a GPU host; the archive's CPU onnxruntime runs on the CPU there:
    the handler took the GPU anyway (full-size nvjpeg decode, images copied back for every forward)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU host, whose worker has gpu_id 0
    ctx = make_context(model_dir)
    ctx.system_properties["gpu_id"] = 0
    handler = ImageClassifierHandler()
    handler.initialize(ctx)
    assert handler.device.type == "cpu" and handler.backend.device.type == "cpu"
    assert handler.jpeg_batch_decoder is None and handler.backend.providers == ["CPUExecutionProvider"]
    out = run(handler, make_context(model_dir), [{"body": bytearray(IMAGES[0])}])
    assert json.loads(out[0])["predictions"]


def test_answers_name_the_model_as_it_was_registered(model_dir):
    """`POST /models?url=shapes.mar&model_name=mine`: the answers said the archive's name, not the model's."""
    ctx = make_context(model_dir)
    registered = Context("mine", str(model_dir), ctx.manifest, 4, None, "0.12.0", model_yaml_config=ctx.model_yaml_config)
    registered.request_processor = ctx.request_processor
    handler = ImageClassifierHandler()
    handler.initialize(registered)
    out = run(handler, registered, [{"body": bytearray(IMAGES[0])}])
    assert json.loads(out[0])["model"] == "mine" and ctx.manifest["model"]["modelName"] == "shapes"
