"""A real TorchServe (Java frontend + Python workers) on loopback, serving freshly built archives."""
import base64
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from inference.images import decode_rgb
from inference.transforms import normalize
from inference.tta import canvas_preset, predict_proba
from tests.conftest import encode, pattern_image
from tests.integration.conftest import ADAPTIVE, ADAPTIVE_THRESHOLD
from tools.client import predict
from tools.photos import phone_photo
from training.checkpoint import load_model

pytestmark = pytest.mark.slow


def _payloads():
    small = [(encode(pattern_image(k, size=s, seed=i), fmt, **kw), ctype)
             for i, (k, s, fmt, kw, ctype) in enumerate([
                 ("circle", 30, "PNG", {}, "image/png"), ("vertical", 41, "JPEG", {"quality": 90}, "image/jpeg"),
                 ("horizontal", 26, "PNG", {}, "image/png"), ("circle", 64, "JPEG", {"quality": 75}, "image/jpeg")])]
    # a 12 MP phone photo, stored sideways with an EXIF orientation: decoded reduced in the DCT domain
    phone = phone_photo(Image.fromarray(pattern_image("vertical", size=300, seed=7)), noise=0.0, sideways=True)
    return small + [(phone, "image/jpeg")]


@pytest.mark.parametrize("model", ["shapes", "shapes_ts", "shapes_tta"])
def test_png_and_jpeg_top1_matches_the_eager_model(server, eager, model):
    spec, probs = eager
    payloads = _payloads()
    ref = probs([p for p, _ in payloads])
    for (data, ctype), row in zip(payloads, ref):
        status, body = predict(server.url, model, data, content_type=ctype)
        assert status == 200, body
        assert set(body) == {"predictions", "model", "version", "tta"} and body["tta"] == "flip"
        preds = body["predictions"]
        assert len(preds) == 2 and all(set(p) == {"class", "index", "confidence"} for p in preds)
        assert preds[0]["index"] == int(row.argmax())
        assert preds[0]["class"] == spec.class_names[preds[0]["index"]]
        assert preds[0]["confidence"] == pytest.approx(row.max().item(), abs=1e-4)


def test_garbage_gets_400_while_good_requests_in_the_same_batch_succeed(server):
    good = encode(pattern_image("circle", size=30))
    jobs = [(good, "image/png"), (b"\x00garbage\xff" * 10, "image/jpeg"), (good, "image/png"), (b"", "image/png")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: predict(server.url, "shapes", j[0], content_type=j[1]), jobs))
    assert results[0][0] == 200 and results[2][0] == 200
    assert results[1][0] == 400 and results[1][1]["error"] == "bad image" and "not an image" in results[1][1]["detail"]
    assert results[3][0] == 400  # empty body


def test_topk_header_and_json_content_type(server):
    data = encode(pattern_image("vertical", size=30))
    req = urllib.request.Request(f"{server.url}/predictions/shapes", data=data, method="POST",
                                 headers={"Content-Type": "image/png", "x-TOP-k": "3"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        assert len(json.loads(r.read())["predictions"]) == 3
    status, body = predict(server.url, "shapes", data, topk=9)
    assert status == 400 and "X-Top-K must be between 1 and 3" in body["detail"]


def test_unknown_model_is_404(server):
    status, _ = predict(server.url, "no_such_model", encode(pattern_image("circle")))
    assert status == 404


def test_int8_and_topk_graphs_serve_the_same_top1(server, eager):
    spec, probs = eager
    payloads = _payloads()
    for model, tta in (("shapes_ov8", "flip"), ("shapes_topk", "none")):  # the top-k graph has no TTA
        ref = probs([p for p, _ in payloads], tta)
        for (data, ctype), row in zip(payloads, ref):
            status, body = predict(server.url, model, data, content_type=ctype)
            assert status == 200, body
            assert body["predictions"][0]["index"] == int(row.argmax()), model
    status, body = predict(server.url, "shapes_topk", payloads[0][0], topk=3)  # the graph returns only 2
    assert status == 400 and "between 1 and 2" in body["detail"]


def test_versioned_management_api_v1_and_v2_side_by_side(server):
    data = encode(pattern_image("horizontal", size=30))
    status, body = server.manage("POST", "/models?url=shapes_v2.mar&initial_workers=1&synchronous=true")
    assert status == 200, body
    try:  # the server is shared with other modules: put back what it served, whatever fails here
        status, versions = server.manage("GET", "/models/shapes/all")
        assert status == 200 and sorted(v["modelVersion"] for v in versions) == ["1.0", "2.0"]
        assert predict(server.url, "shapes", data)[1]["version"] == "1.0"  # the default stays 1.0
        status, body = predict(server.url, "shapes/2.0", data)
        assert status == 200 and body["version"] == "2.0" and body["tta"] == "none"
        assert server.manage("PUT", "/models/shapes/2.0/set-default")[0] == 200
        assert predict(server.url, "shapes", data)[1]["version"] == "2.0"
    finally:
        assert server.manage("PUT", "/models/shapes/1.0/set-default")[0] == 200
        assert server.manage("DELETE", "/models/shapes/2.0")[0] == 200


def _multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "----shapes-test-boundary"
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_and_json_requests_with_several_images(server, eager):
    import base64
    _, probs = eager
    images = [p for p, ctype in _payloads() if ctype == "image/png"]
    ref = probs(images).argmax(1).tolist()
    body, ctype = _multipart([("a", images[0]), ("b", images[1])], {"topk": "1"})
    status, out = predict(server.url, "shapes", body, content_type=ctype)
    assert status == 200 and isinstance(out, list) and [o["predictions"][0]["index"] for o in out] == ref
    assert all(len(o["predictions"]) == 1 for o in out)
    body = json.dumps({"data": [base64.b64encode(p).decode() for p in images], "topk": 3}).encode()
    status, out = predict(server.url, "shapes", body, content_type="application/json")
    assert status == 200 and [o["predictions"][0]["index"] for o in out] == ref
    assert all(len(o["predictions"]) == 3 for o in out)
    status, out = predict(server.url, "shapes", json.dumps({"data": "%%%"}).encode(), content_type="application/json")
    assert status == 400 and out["error"] == "bad base64"


def test_adaptive_tta_is_reported_per_image(server, checkpoint):
    """Several images in one request: each gets TTA exactly when the eager model's plain top-1 confidence is below
    the archive's threshold, and its confidence is the eager model's with that TTA or without it."""
    spec, model = load_model(checkpoint)
    images = [data for data, _ in _payloads()] + [encode(pattern_image(k, size=30, seed=s) // 2 + 64)  # low contrast
                                                   for k, s in (("circle", 11), ("vertical", 12), ("horizontal", 13))]

    def probs(tta):  # offline, as the handler does: the TTA's canvas, then its views, in one forward
        canvas = canvas_preset(tta, crop_size=spec.input_size, resize_size=spec.resize_size)
        batch = canvas.batch([decode_rgb(p, min_side=canvas.min_decode_side) for p in images])
        with torch.no_grad():
            return predict_proba(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), batch, tta,
                                 crop_size=spec.input_size)
    plain, ten = probs("none"), probs("ten_crop")
    conf = plain.max(1).values
    keep = [i for i, c in enumerate(conf.tolist()) if abs(c - ADAPTIVE_THRESHOLD) > 1e-4]  # not on the edge
    body = json.dumps({"data": [base64.b64encode(images[i]).decode() for i in keep], "topk": 1}).encode()
    status, out = predict(server.url, ADAPTIVE, body, content_type="application/json")
    assert status == 200 and len(out) == len(keep), out
    for answer, i in zip(out, keep):
        expected = bool(conf[i] < ADAPTIVE_THRESHOLD)
        assert answer["tta_applied"] is expected and answer["tta"] == ("ten_crop" if expected else "none"), (i, answer)
        reference = (ten if expected else plain)[i]
        assert answer["predictions"][0]["index"] == int(reference.argmax())
        assert abs(answer["predictions"][0]["confidence"] - float(reference.max())) < 1e-3, (i, answer, reference)
    print(f"\nADAPTIVE per image: tta_applied {[a['tta_applied'] for a in out]}, plain confidence "
          f"{[round(c, 4) for c in conf.tolist()]}")
    assert {a["tta_applied"] for a in out} == {True, False}  # both branches, in one request


def test_handler_metrics_reach_the_prometheus_endpoint(server):
    for data, ctype in _payloads():
        assert predict(server.url, ADAPTIVE, data, content_type=ctype)[0] == 200
    with urllib.request.urlopen(f"{server.metrics_url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for name in ("DecodeMs", "PreprocessMs", "ForwardMs", "BatchSize", "TTAViewsPerImage", "AdaptiveTTATriggerRate"):
        lines = [ln for ln in text.splitlines() if ln.startswith(name) and f'ModelName="{ADAPTIVE}"' in ln]
        assert lines, f"{name} not on /metrics"
        value = float(lines[-1].rsplit(" ", 1)[1])
        low, high = {"BatchSize": (1, 8), "TTAViewsPerImage": (1, 10), "AdaptiveTTATriggerRate": (0, 100),  # percent
                     "ForwardMs": (1e-6, 60_000)}.get(name, (0, 60_000))
        assert low <= value <= high, (name, value)
    counters = {name: _sample(text, name, ADAPTIVE) for name in ("ImagesTotal", "TTAImagesTotal", "ForwardViewsTotal")}
    assert counters["ImagesTotal"] >= len(_payloads()), counters  # every image of every batch (of earlier tests too)
    assert 0 <= counters["TTAImagesTotal"] <= counters["ImagesTotal"] <= counters["ForwardViewsTotal"], counters
    before = _sample(text, "RequestErrorsTotal", ADAPTIVE, Status="400") or 0
    assert predict(server.url, ADAPTIVE, b"not an image", content_type="image/png")[0] == 400
    deadline, seen = time.monotonic() + 10, None  # the frontend reads the worker's metric lines from its log
    while time.monotonic() < deadline and seen != before + 1:
        with urllib.request.urlopen(f"{server.metrics_url}/metrics", timeout=30) as r:
            seen = _sample(r.read().decode(), "RequestErrorsTotal", ADAPTIVE, Status="400")
        time.sleep(0.1)
    assert seen == before + 1, (before, seen)


def _sample(text: str, name: str, model: str, **labels) -> float | None:
    """The value of ``name``'s series for ``model`` (and ``labels``) on a /metrics page; None where it has none."""
    want = [f'ModelName="{model}"', *(f'{k}="{v}"' for k, v in labels.items())]
    lines = [ln for ln in text.splitlines() if ln.startswith(name + "{") and all(w in ln for w in want)]
    return float(lines[-1].rsplit(" ", 1)[1]) if lines else None
