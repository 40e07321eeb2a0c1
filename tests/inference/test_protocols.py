"""inference.protocols: TorchServe native, KServe v1 and Open Inference Protocol v2 bodies."""
import base64
import json
import struct

import pytest

from inference import protocols
from inference.protocols import (
    KSERVE_V1,
    OIP_V2,
    TORCHSERVE,
    detect,
    is_grpc_call,
    read,
    read_row,
    render,
    render_error,
)
from inference.requests import Request, RequestError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
JPEG = b"\xff\xd8\xff\xe0" + b"\x01" * 20
B64 = base64.b64encode(PNG).decode()


def oip(data, **extra):
    return {"inputs": [{"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}], **extra}


def test_the_protocol_is_told_by_the_body():
    assert detect({"body": bytearray(PNG)}, {}) == TORCHSERVE
    assert detect({"body": {"data": B64}}, {}) == TORCHSERVE
    assert detect({"body": {"instances": [B64]}}, {}) == KSERVE_V1
    assert detect({"body": oip([B64])}, {}) == OIP_V2
    assert detect({"body": bytearray(b'{"inputs": []}')}, {"inference-header-content-length": "14"}) == OIP_V2
    assert detect({"data": bytearray(PNG)}, {}) == TORCHSERVE  # multipart / gRPC Predictions
    # a JSON body sent without a JSON content type arrives as bytes: still told by its shape
    assert detect({"body": bytearray(json.dumps({"instances": [B64]}).encode())}, {}) == KSERVE_V1


def test_kserve_v1_instances_in_every_documented_shape():
    body = {"instances": [{"data": B64}, {"b64": B64}, B64, {"data": {"b64": B64}}, {"image_bytes": {"b64": B64}}],
            "topk": 2}
    req = read({"body": body}, KSERVE_V1)
    assert req.images == [PNG] * 5 and req.multi and req.topk == 2 and req.protocol == KSERVE_V1
    assert read({"body": {"instances": [B64], "parameters": {"topk": 3}}}, KSERVE_V1).topk == 3


@pytest.mark.parametrize("body,match", [
    ({"instances": []}, "non-empty list"),
    ({"instances": "x"}, "non-empty list"),
    ({"instances": [{"data": B64}, {"data": "%%%"}]}, r"instances\[1\] is not valid base64"),
    ({"instances": [{"image": B64}]}, r"instances\[0\]: expected a base64 string"),
])
def test_kserve_v1_errors_name_the_instance(body, match):
    with pytest.raises(RequestError, match=match):
        read({"body": body}, KSERVE_V1)


def test_oip_v2_json_request():
    req = read({"body": oip([B64, B64], id="r-1", parameters={"topk": 3}, outputs=[{"name": "labels"}])}, OIP_V2)
    assert req.images == [PNG, PNG] and req.id == "r-1" and req.topk == 3 and req.outputs == ("labels",)
    nested = oip([[B64], [B64]])
    nested["inputs"][0]["shape"] = [2, 1]
    assert read({"body": nested}, OIP_V2).images == [PNG, PNG]


def test_oip_v2_binary_tensor_extension_with_raw_and_base64_elements():
    elements = [JPEG, B64.encode()]
    blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    head = json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    req = read({"body": bytearray(head + blob)}, OIP_V2, headers={"Inference-Header-Content-Length": str(len(head))})
    assert req.images == [JPEG, PNG]


@pytest.mark.parametrize("body,match", [
    ({"inputs": []}, "exactly one tensor"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [0.5]}]}, "datatype must be BYTES"),
    ({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": [B64]}]}, r"shape \[3\] holds 3"),
    ({"inputs": [{"name": "image", "shape": "2", "datatype": "BYTES", "data": [B64]}]}, "shape must be \\[N\\] or \\[N, 1\\]"),
    ({**oip([B64]), "outputs": [{"name": "probabilities"}]}, '"outputs" may name labels, scores, indices'),
    ({**oip([B64]), "id": 7}, '"id" must be a string'),
    ({**oip([B64]), "outputs": [{"name": ["labels"]}]}, '"outputs" may name'),  # unhashable: still a 400
    ({"inputs": [{**oip([B64])["inputs"][0], "parameters": {"binary_data_size": "100"}}]}, "binary_data_size must be"),
    ({"inputs": [{**oip([B64])["inputs"][0], "parameters": {"binary_data_size": -1}}]}, "binary_data_size must be"),
    (oip(["not base64!"]), "element 0 is not valid base64"),
])
def test_oip_v2_malformed_requests(body, match):
    with pytest.raises(RequestError, match=match):
        read({"body": body}, OIP_V2)


def test_binary_request_with_a_wrong_header_length():
    with pytest.raises(RequestError, match="does not frame a JSON inference header"):
        read({"body": bytearray(b'{"inputs": []}xx')}, OIP_V2, headers={"inference-header-content-length": "3"})


def test_max_images_holds_for_every_protocol():
    with pytest.raises(RequestError, match="limit is 2") as e:
        read({"body": {"instances": [B64] * 3}}, KSERVE_V1, max_images=2)
    assert e.value.status == 413
    with pytest.raises(RequestError, match="limit is 2"):
        read({"body": oip([B64] * 3)}, OIP_V2, max_images=2)


RESULTS = [{"predictions": [{"class": "cat", "index": 1, "confidence": 0.75},
                            {"class": "dog", "index": 0, "confidence": 0.25}], "model": "m", "version": "1", "tta": "flip"},
           {"predictions": [{"class": "dog", "index": 0, "confidence": 0.5},
                            {"class": "cat", "index": 1, "confidence": 0.5}], "model": "m", "version": "1", "tta": "flip"}]


def test_answers_per_protocol():
    assert json.loads(render(Request([PNG]), RESULTS[:1], model_name="m", model_version="1")) == RESULTS[0]
    assert json.loads(render(Request([PNG, PNG], multi=True), RESULTS, model_name="m", model_version="1")) == RESULTS
    v1 = json.loads(render(Request([PNG] * 2, multi=True, protocol=KSERVE_V1), RESULTS, model_name="m",
                           model_version="1"))
    assert v1 == {"predictions": RESULTS}  # real objects, not JSON strings
    v2 = json.loads(render(Request([PNG] * 2, multi=True, protocol=OIP_V2, id="r-1"), RESULTS, model_name="m",
                           model_version="1"))
    assert v2["id"] == "r-1" and v2["model_name"] == "m" and v2["model_version"] == "1"
    out = {o["name"]: o for o in v2["outputs"]}
    assert out["labels"] == {"name": "labels", "datatype": "BYTES", "shape": [2, 2], "data": ["cat", "dog", "dog", "cat"]}
    assert out["scores"]["datatype"] == "FP32" and out["scores"]["data"] == [0.75, 0.25, 0.5, 0.5]
    assert out["indices"]["datatype"] == "INT64" and out["indices"]["data"] == [1, 0, 0, 1]
    only = json.loads(render(Request([PNG] * 2, multi=True, protocol=OIP_V2, outputs=("scores",)), RESULTS,
                             model_name="m", model_version="1"))
    assert [o["name"] for o in only["outputs"]] == ["scores"] and only["id"] == ""


def test_error_bodies_per_protocol():
    err = json.loads(render_error(OIP_V2, "bad image", "not an image", status=400, model_name="m", model_version="1"))
    assert err == {"error": "bad image: not an image"}  # the protocol's $inference_error_response, over HTTP
    err = json.loads(render_error(OIP_V2, "bad image", "not an image", status=400, model_name="m", model_version="1",
                                  grpc=True))
    assert err["error"] == "bad image: not an image"
    # what TorchServe's OIP gRPC path needs to turn it into a ModelInferResponse without killing the worker
    assert err["model_name"] == "m" and err["id"] == "" and err["outputs"][0]["data"] == ["bad image: not an image"]
    for protocol in (TORCHSERVE, KSERVE_V1):
        assert json.loads(render_error(protocol, "bad image", "not an image", status=413)) == \
            {"error": "bad image", "detail": "not an image", "code": 413}


def test_grpc_calls_are_told_apart_from_http_requests_by_their_headers():
    """What TorchServe 0.12 hands the handler (seen on a real server): an HTTP request's own headers are
    strings; a gRPC call has only its inputs' content-type dicts. Only gRPC answers get ts_stream_next."""
    assert is_grpc_call({"data": {"content-type": ""}})                 # gRPC Predictions / StreamPredictions
    assert is_grpc_call({"body": {"content-type": "application/json"}})  # OIP ModelInfer
    assert is_grpc_call({}) and is_grpc_call(None)
    assert not is_grpc_call({"Host": "127.0.0.1:8080", "content-length": "12", "body": {"content-type": "image/png"}})


def test_data_nested_deeper_than_python_recursion_is_read_in_order():
    nested = [B64]
    for _ in range(5000):  # past sys.getrecursionlimit(): _flatten is a loop, not recursion
        nested = [nested]
    req = read({"body": {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [[B64], nested]}]}},
               OIP_V2)
    assert req.images == [PNG, PNG]


ROW = dict(max_images=4, default_topk=2, max_topk=3)


def test_read_row_answers_every_request_and_raises_nothing(monkeypatch):
    # JSON nested deeper than Python's parser goes (TorchServe hands it over as bytes): a 400, not a crash
    deep = bytearray(b'{"inputs":' + b"[" * 5_000 + b"]" * 5_000 + b"}")
    protocol, err, topk = read_row({"body": deep}, {"content-type": "application/json"}, **ROW)
    assert protocol == TORCHSERVE and isinstance(err, RequestError) and err.status == 400 and topk is None
    deeper = bytearray(b'{"inputs":' + b"[" * 50_000 + b"]" * 50_000 + b"}")  # more values than are ever parsed
    protocol, err, topk = read_row({"body": deeper}, {"content-type": "application/json"}, **ROW)
    assert isinstance(err, RequestError) and err.status == 413 and topk is None
    protocol, req, topk = read_row({"body": oip([B64], parameters={"topk": 3})}, {}, **ROW)
    assert protocol == OIP_V2 and req.images == [PNG] and topk == 3
    # a bug of ours on an odd request is that request's 500, named, never an exception into TorchServe
    monkeypatch.setattr(protocols, "read_kserve_v1", lambda body, **_: {}["boom"])
    protocol, err, _ = read_row({"body": {"instances": [B64]}}, {}, **ROW)
    assert protocol == KSERVE_V1 and err.status == 500 and "KeyError" in str(err)


def test_multipart_text_fields_are_not_images_and_any_field_name_is_a_file():
    form = {"content-type": "multipart/form-data; boundary=x", "Host": "127.0.0.1"}
    row = {"data": bytearray(PNG), "note": bytearray(b"holiday"), "topk": bytearray(b"1")}
    types = {"data": {"content-type": "image/png"}, "note": {"content-type": ""}, "topk": {"content-type": ""}}
    req = read(row, TORCHSERVE, headers={**form, **types})
    assert req.images == [PNG] and not req.multi and req.topk == b"1"
    row = {"body": bytearray(PNG), "other": bytearray(JPEG)}  # a file field named "body" is one of the files
    types = {"body": {"content-type": "image/png"}, "other": {"content-type": "application/octet-stream"}}
    assert read(row, TORCHSERVE, headers={**form, **types}).images == [PNG, JPEG]
    # a gRPC call's inputs carry no content type: every one is an image
    assert read({"data": bytearray(PNG)}, TORCHSERVE, headers={"data": {"content-type": ""}}).images == [PNG]


def test_json_bodies_sent_as_bytes_with_leading_whitespace_or_a_bom_are_json():
    """`curl --data-binary @request.json` of a pretty-printed file: a newline (or a BOM) before the "{"."""
    body = json.dumps(oip([B64]), indent=2).encode()
    for raw in (b"\n" + body, b"  \r\n\t" + body, b"\xef\xbb\xbf" + body):
        protocol, req, _ = read_row({"body": bytearray(raw)}, {"Content-Type": "application/octet-stream"}, **ROW)
        assert protocol == OIP_V2 and req.images == [PNG]
    protocol, req, _ = read_row({"body": bytearray(b"\n" + PNG)}, {}, **ROW)  # not JSON: an image
    assert protocol == TORCHSERVE and req.images == [b"\n" + PNG]


def test_a_gzip_body_is_read_in_its_protocol_and_a_bomb_is_a_413():
    import gzip
    body = json.dumps({"instances": [B64]}).encode()
    protocol, req, _ = read_row({"body": bytearray(gzip.compress(body))}, {"Content-Encoding": "gzip"}, **ROW)
    assert protocol == KSERVE_V1 and req.images == [PNG]
    protocol, err, _ = read_row({"body": bytearray(gzip.compress(b"\0" * (8 << 20)))}, {"Content-Encoding": "gzip"},
                                **ROW, max_inflated=1 << 20)
    assert protocol == TORCHSERVE and err.status == 413


def test_a_compressed_json_list_of_images_is_read_as_json():
    import gzip
    protocol, req, _ = read_row({"body": bytearray(gzip.compress(json.dumps([B64, B64]).encode()))},
                                {"Content-Type": "application/json", "Content-Encoding": "gzip"}, **ROW)
    assert protocol == TORCHSERVE and req.images == [PNG, PNG] and req.multi


def test_a_body_is_parsed_once_however_it_arrives(monkeypatch):
    """JSON that arrives as bytes (compressed, or without a JSON content type) is parsed once per request:
    detecting the protocol and reading the images share it (8 KB of gzip can hold 8 MB of JSON)."""
    import gzip
    calls = []
    real = protocols.json.loads
    monkeypatch.setattr(protocols.json, "loads", lambda *a, **k: calls.append(1) or real(*a, **k))
    body = bytearray(gzip.compress(json.dumps({"instances": [B64, B64]}).encode()))
    protocol, req, _ = read_row({"body": body}, {"Content-Encoding": "gzip"}, max_images=4, default_topk=1,
                                max_topk=3)
    assert protocol == KSERVE_V1 and len(req.images) == 2 and len(calls) == 1


def test_an_answer_longer_than_max_response_bytes_becomes_a_413():
    assert protocols.bounded("x" * 1024, limit=1024) is None
    err = protocols.bounded("x" * 1025, limit=1024)
    assert err.status == 413 and err.error == "answer too large" and "1025 bytes" in str(err)
    assert protocols.status_of(err) == (413, "answer too large")


def test_kserve_v1_reads_tf_servings_named_input_beside_other_keys():
    """TF-Serving's {"image_bytes": {"b64": ...}, "key": "1"} (its documented form with a passthrough key)."""
    body = {"instances": [{"image_bytes": {"b64": B64}, "key": "1"}, {"data": B64, "key": "2"}]}
    protocol, req, _ = read_row({"body": body}, {}, **ROW)
    assert protocol == KSERVE_V1 and req.images == [PNG, PNG]
    _, err, _ = read_row({"body": {"instances": [{"a": {"b64": B64}, "b": {"b64": B64}}]}}, {}, **ROW)  # which one?
    assert isinstance(err, RequestError) and "instances[0]" in str(err)


def test_an_answer_that_cannot_be_built_is_that_requests_500_not_the_batchs():
    """Reading a request never raises into TorchServe (read_row); building its answer does not either."""
    req = Request([b"x"], multi=True, protocol="oip_v2")
    broken = [{"predictions": [{"class": "cat"}], "tta": "none"}]  # no index/confidence: a renderer's KeyError
    err = protocols.answer(req, broken, model_name="m", model_version="1")
    assert isinstance(err, RequestError) and err.status == 500 and "KeyError" in str(err)
    good = protocols.answer(Request([b"x"], multi=False), RESULTS[:1], model_name="m", model_version="1")
    assert json.loads(good)["predictions"][0]["class"] == "cat"


def test_a_new_protocol_is_one_registry_entry(monkeypatch):
    """Adding a schema touches inference.protocols.REGISTRY alone: detection, reading, answers, errors and
    explanations all go through it (and a protocol without explanations is told so)."""
    from inference.explain_requests import explain_request
    from inference.protocols import REGISTRY, Protocol
    from inference.requests import decode_b64

    toy = Protocol(
        "toy", "the toy protocol",
        matches=lambda body, headers: isinstance(body, dict) and "pictures" in body,
        read=lambda row, body, headers, *, max_images: Request(
            [decode_b64(x, f"pictures[{i}]") for i, x in enumerate(body["pictures"])], multi=True, protocol="toy"),
        render=lambda req, results, **_: json.dumps({"labels": [r["class"] for r in results]}),
        render_error=lambda kind, detail, *, status, **_: json.dumps({"problem": detail, "status": status}),
        explanations=None)
    monkeypatch.setattr(protocols, "REGISTRY", {"toy": toy, **REGISTRY})
    protocol, req, topk = read_row({"body": {"pictures": [B64, B64]}}, {}, max_images=4, default_topk=1, max_topk=5)
    assert protocol == "toy" and req.images == [PNG, PNG] and topk == 1
    assert render(req, [{"class": "cat"}, {"class": "dog"}], model_name="m", model_version="1") == \
        '{"labels": ["cat", "dog"]}'
    protocol, err, _ = read_row({"body": {"pictures": ["%%"]}}, {}, max_images=4, default_topk=1, max_topk=5)
    assert protocol == "toy" and json.loads(render_error(protocol, "bad base64", str(err), status=400)) == \
        {"problem": str(err), "status": 400}
    with pytest.raises(RequestError, match="not in the toy protocol") as e:
        explain_request(lambda x: x, None, req, settings=None, output="logits", class_names=[])
    assert e.value.status == 501
    assert detect({"body": {"instances": [B64]}}, {}) == KSERVE_V1  # the others are asked as before


def test_a_protocol_that_fails_to_tell_a_body_fails_that_request_alone(monkeypatch):
    """Detection runs inside read_row's guard, the headers-only guess too: a registered protocol whose
    ``matches`` raises is that request's 500, never an exception into TorchServe (the whole batch's 503);
    an unregistered name is a ValueError that names the registered ones."""
    from inference.protocols import REGISTRY, Protocol, lookup

    def broken(body, headers):
        raise TypeError("a bug in a new protocol")
    bad = Protocol("bad", "a bad protocol", broken, REGISTRY[TORCHSERVE].read, REGISTRY[TORCHSERVE].render,
                   REGISTRY[TORCHSERVE].render_error, explanations=None)
    monkeypatch.setattr(protocols, "REGISTRY", {"bad": bad, **REGISTRY})
    protocol, err, topk = read_row({"body": bytearray(PNG)}, {}, max_images=4, default_topk=1, max_topk=5)
    assert protocol == TORCHSERVE and isinstance(err, RequestError) and err.status == 500 and topk is None
    assert "TypeError" in str(err) and "a bug in a new protocol" not in str(err)  # its message: in the log
    with pytest.raises(ValueError, match="unknown protocol 'v3'; registered: bad, kserve_v1, oip_v2, torchserve"):
        lookup("v3")


def test_json_of_millions_of_values_is_refused_before_it_is_built(monkeypatch):
    """A 16 KB gzip body inflates to 5.4 million ``{}`` (16 MB): json.loads built them all (1.3 s, +430 MB) before
    the image count could refuse the request. Objects, arrays and items are counted first, at C speed."""
    import gzip

    from inference.requests import MAX_JSON_VALUES
    calls = []
    real = protocols.json.loads
    monkeypatch.setattr(protocols.json, "loads", lambda *a, **k: calls.append(1) or real(*a, **k))
    for raw in (b"[" + b"{}," * 5_400_000 + b"{}]", json.dumps({"inputs": [{"name": "image", "shape": [1],
                                                                "datatype": "BYTES", "data": [[]] * 100_000}]}).encode()):
        body = bytearray(gzip.compress(raw))
        assert len(body) < 100_000 < len(raw)
        protocol, err, _ = read_row({"body": body}, {"Content-Encoding": "gzip"}, **ROW)
        assert isinstance(err, RequestError) and err.status == 413, err
        assert f"at most {MAX_JSON_VALUES} are read" in str(err)
    assert calls == []  # refused unparsed
    # Triton's binary extension: the JSON inference header is counted the same way
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4}}], "x": [[]] * 20_000}).encode()
    protocol, err, _ = read_row({"body": bytearray(head + b"\0\0\0\0")},
                                {"Inference-Header-Content-Length": str(len(head)),
                                 "Content-Type": "application/octet-stream"}, **ROW)
    assert err.status == 413 and "objects, arrays and items" in str(err)
    # a real request of the most images allowed passes
    protocol, req, _ = read_row({"body": bytearray(gzip.compress(json.dumps({"instances": [B64] * 4}).encode()))},
                                {"Content-Encoding": "gzip"}, **ROW)
    assert protocol == KSERVE_V1 and len(req.images) == 4
