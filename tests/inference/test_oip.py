"""inference.oip: the Open Inference Protocol's answers, the classification extension, the binary tensor
extension's sizes, and requests as tritonclient builds them (its own request encoder, not ours)."""
import base64
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.http._utils import _get_inference_request

from inference.oip import OIP_V2, BinaryAnswer, oip_answer, read_oip_v2
from inference.protocols import answer_headers, read_row, render
from inference.requests import Request, RequestError

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
B64 = base64.b64encode(PNG).decode()
RESULTS = [{"predictions": [{"class": "cat", "index": 1, "confidence": 0.75},
                            {"class": "dog", "index": 0, "confidence": 0.25}], "tta": "flip"},
           {"predictions": [{"class": "dog", "index": 0, "confidence": 0.5},
                            {"class": "cat", "index": 1, "confidence": 0.5}], "tta": "flip"}]
ROW = dict(max_images=4, default_topk=2, max_topk=3)


def tritonclient_body(outputs, *, binary=True, parameters=None) -> tuple[bytes, dict]:
    """The body and headers tritonclient.http's infer() sends for two PNGs (its own encoder)."""
    image = triton_http.InferInput("image", [2], "BYTES")
    images = [PNG, PNG] if binary else [B64, B64]  # in JSON, base64 text (what the README shows)
    image.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)
    body, json_size = _get_inference_request(inputs=[image], request_id="r-1", outputs=outputs,
                                             sequence_id=0, sequence_start=False, sequence_end=False,
                                             priority=0, timeout=None, custom_parameters=parameters)
    headers = {"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {}
    return (body if isinstance(body, bytes) else body.encode()), headers


def test_tritonclient_class_count_is_tritons_classification_extension():
    body, headers = tritonclient_body([triton_http.InferRequestedOutput("scores", class_count=1),
                                       triton_http.InferRequestedOutput("labels")])
    protocol, req, topk = read_row({"body": bytearray(body)}, headers, **ROW)
    assert protocol == OIP_V2 and req.images == [PNG, PNG] and req.classification == {"scores": 1} and topk == 1
    answer = oip_answer(req, [{**r, "predictions": r["predictions"][:1]} for r in RESULTS], model_name="m",
                        model_version="1")
    scores, labels = answer["outputs"]
    assert scores == {"name": "scores", "datatype": "BYTES", "shape": [2, 1], "data": ["0.750000:1:cat", "0.500000:0:dog"]}
    assert labels["data"] == ["cat", "dog"] and labels["shape"] == [2, 1]
    # the largest count asked for is the request's k; each output keeps its own
    _, req, topk = read_row(oip_row({}, outputs=[{"name": "labels", "parameters": {"classification": 2}},
                                                 {"name": "indices", "parameters": {"classification": 1}}],
                                    parameters={"topk": 1}), {}, **ROW)
    assert topk == 2 and req.classification == {"labels": 2, "indices": 1}
    answer = oip_answer(req, RESULTS[:1], model_name="m", model_version="1")
    assert [o["data"] for o in answer["outputs"]] == [["0.750000:1:cat", "0.250000:0:dog"], ["0.750000:1:cat"]]


@pytest.mark.parametrize("classification", [0, -1, "2", 1.5, True])
def test_a_bad_classification_count_is_a_400(classification):
    with pytest.raises(RequestError, match="parameters.classification must be an integer >= 1"):
        read_oip_v2({"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [B64]}],
                     "outputs": [{"name": "scores", "parameters": {"classification": classification}}]})


def test_a_classification_count_beyond_the_classes_is_every_class_as_triton_answers():
    body, headers = tritonclient_body([triton_http.InferRequestedOutput("scores", class_count=9)])
    _, req, topk = read_row({"body": bytearray(body)}, headers, **ROW)
    assert req.classification == {"scores": 3} and topk == 3


def test_default_binary_outputs_and_json_inputs_from_tritonclient_are_read():
    for binary in (True, False):
        body, headers = tritonclient_body([triton_http.InferRequestedOutput("indices")], binary=binary,
                                          parameters={"topk": 3})
        _, req, topk = read_row({"body": bytearray(body)}, headers, **ROW)
        assert isinstance(req, Request) and req.images == [PNG, PNG] and req.outputs == ("indices",) and topk == 3


def test_adaptive_tta_is_a_bool_tensor_and_every_parameter_a_scalar():
    adaptive = [{**RESULTS[0], "tta_applied": True}, {**RESULTS[1], "tta_applied": False}]
    answer = json.loads(render(Request([PNG] * 2, multi=True, protocol=OIP_V2), adaptive, model_name="m",
                               model_version="1"))
    assert [o["name"] for o in answer["outputs"]] == ["labels", "scores", "indices", "tta_applied"]
    assert answer["outputs"][3] == {"name": "tta_applied", "datatype": "BOOL", "shape": [2], "data": [True, False]}
    assert answer["parameters"] == {"tta": "flip", "tta_applied_count": 1}
    plain = oip_answer(Request([PNG] * 2, multi=True, protocol=OIP_V2, outputs=("tta_applied",)), RESULTS,
                       model_name="m", model_version="1")  # asked for without adaptive TTA: what ran
    assert plain["outputs"][0]["data"] == [True, True] and plain["parameters"] == {"tta": "flip"}


def test_base64_text_with_line_breaks_in_a_binary_tensor_is_read_as_in_json():
    """`base64 a.png` (no -w0) and Python's encodebytes() wrap lines every 76 characters: the JSON path dropped
    the line breaks, the binary tensor path took the text itself for the image."""
    wrapped = base64.encodebytes(PNG * 4)
    image = triton_http.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([wrapped], dtype=object), binary_data=True)
    body, json_size = _get_inference_request(inputs=[image], request_id="", outputs=None, sequence_id=0,
                                             sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                             custom_parameters=None)
    req = read_oip_v2(bytearray(body), {"Inference-Header-Content-Length": str(json_size)})
    assert b"\n" in wrapped and req.images == [PNG * 4]


def test_binary_data_size_must_be_the_bytes_that_follow():
    element = struct.pack("<I", len(PNG)) + PNG
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(element)}}]}).encode()
    headers = {"inference-header-content-length": str(len(head))}
    assert read_oip_v2(bytearray(head + element), headers).images == [PNG]
    for blob, text in ((element[:-3], f"is {len(element)} but {len(element) - 3} bytes follow"),
                       (element + b"tail", f"is {len(element)} but {len(element) + 4} bytes follow")):
        with pytest.raises(RequestError, match=text):
            read_oip_v2(bytearray(head + blob), headers)


def test_an_empty_outputs_list_is_every_output():
    req = read_oip_v2({"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [B64]}], "outputs": []})
    assert req.outputs is None


def oip_row(tensor: dict, **extra) -> dict:
    return {"body": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64], **tensor}],
                     **extra}}


@pytest.mark.parametrize("tensor,match", [
    ({"datatype": "A" * 9_000_000}, "datatype must be BYTES"),
    ({"shape": [0] * 5_000_000}, "shape must be [N] or [N, 1]"),
    ({"shape": [2] * 9}, "shape must be [N] or [N, 1]"),
    ({"shape": [10 ** 3999, 1]}, "holds over 2**63 images; the limit is 4"),  # never multiplied out
    ({"shape": [1, 2], "data": [B64, B64]}, "shape must be [N] or [N, 1] for N images, got [1, 2]"),  # was [1, k]
    ({"shape": [2, 1, 1], "data": [B64, B64]}, "shape must be [N] or [N, 1]"),
    ({"shape": [True]}, "shape must be [N] or [N, 1]"),
    ({"name": "é" * 1_000_000, "datatype": "FP32"}, "datatype must be BYTES"),
])
def test_a_hostile_tensor_is_a_short_400(tensor, match):
    """Each is a 400 whose body quotes a few dozen characters of what was sent (an answer over TorchServe's
    max_response_size drops the worker and its batch), found without multiplying a huge shape out."""
    protocol, err, _ = read_row(oip_row(tensor), {}, **ROW)
    assert isinstance(err, RequestError) and err.status == (413 if "limit" in match else 400), err
    assert match in str(err) and len(str(err)) < 400, str(err)[:300]


def test_a_long_id_is_refused_and_a_bad_topk_beside_classification_is_a_400():
    _, err, _ = read_row(oip_row({}, id="x" * 2000), {}, **ROW)
    assert isinstance(err, RequestError) and "at most 1024 characters" in str(err)
    for topk in ("abc", -3, 1.5):
        row = oip_row({}, outputs=[{"name": "labels", "parameters": {"classification": 2}}],
                      parameters={"topk": topk})
        _, err, _ = read_row(row, {}, **ROW)
        assert isinstance(err, RequestError) and err.error == "bad top-k", (topk, err)


@pytest.mark.parametrize("length", ["-5", "0", "99999"])
def test_a_binary_header_length_outside_the_body_is_a_400(length):
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]}).encode()
    _, err, _ = read_row({"body": bytearray(head + b"12345")}, {"Inference-Header-Content-Length": length}, **ROW)
    assert isinstance(err, RequestError) and "does not frame a JSON inference header" in str(err), err


def decoded(answer) -> triton_http.InferResult:
    """An answer as tritonclient.http reads it (its own decoder), with the headers the handler sends."""
    headers = answer_headers(answer)
    length = headers.get("Inference-Header-Content-Length")
    return triton_http.InferResult.from_response_body(bytes(answer) if isinstance(answer, bytes) else answer.encode(),
                                                      False, int(length) if length else None)


def test_outputs_asked_in_binary_form_are_answered_in_tritons_binary_form():
    """tritonclient's default (binary_data=True on each output) next to one output asked in JSON: the binary
    ones carry binary_data_size and no data, and tritonclient's decoder gives back every value."""
    body, headers = tritonclient_body([triton_http.InferRequestedOutput("scores", class_count=2),
                                       triton_http.InferRequestedOutput("labels"),
                                       triton_http.InferRequestedOutput("indices", binary_data=False)])
    _, req, topk = read_row({"body": bytearray(body)}, headers, **ROW)
    assert req.binary == {"scores", "labels"} and topk == 2
    adaptive = [{**RESULTS[0], "tta_applied": True}, {**RESULTS[1], "tta_applied": False}]
    answer = render(req, adaptive, model_name="m", model_version="1")
    assert isinstance(answer, BinaryAnswer)
    assert answer_headers(answer) == {"content-type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(answer.header_length)}
    result = decoded(answer)
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["scores", "labels", "indices"]
    assert [o.get("parameters", {}).get("binary_data_size") for o in outputs] == [72, 28, None]
    assert "data" not in outputs[0] and "data" not in outputs[1] and outputs[2]["data"] == [1, 0, 0, 1]
    assert result.as_numpy("scores").tolist() == [[b"0.750000:1:cat", b"0.250000:0:dog"],
                                                  [b"0.500000:0:dog", b"0.500000:1:cat"]]
    assert result.as_numpy("labels").tolist() == [[b"cat", b"dog"], [b"dog", b"cat"]]
    assert result.as_numpy("indices").tolist() == [[1, 0], [0, 1]]


def test_binary_data_output_answers_every_output_in_binary_form_unless_one_says_false():
    """The request's parameters.binary_data_output (tritonclient has no switch for it): every output of the
    default answer, numbers exactly as JSON gives them (FP32 of the same values, INT64, BOOL)."""
    inputs = [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [B64, B64]}]
    adaptive = [{**RESULTS[0], "tta_applied": True}, {**RESULTS[1], "tta_applied": False}]
    plain = json.loads(render(read_oip_v2({"inputs": inputs}), adaptive, model_name="m", model_version="1"))
    req = read_oip_v2({"inputs": inputs, "parameters": {"binary_data_output": True}})
    result = decoded(render(req, adaptive, model_name="m", model_version="1"))
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    for tensor in plain["outputs"]:
        got = result.as_numpy(tensor["name"])
        assert list(got.shape) == tensor["shape"], tensor["name"]
        want = np.array(tensor["data"], dtype=got.dtype if tensor["datatype"] != "BYTES" else object)
        if tensor["datatype"] == "BYTES":
            want = np.array([s.encode() for s in tensor["data"]], dtype=object)
        assert got.flatten().tolist() == want.tolist(), tensor["name"]
    assert result.as_numpy("scores").dtype == np.float32 and result.as_numpy("indices").dtype == np.int64
    req = read_oip_v2({"inputs": inputs, "parameters": {"binary_data_output": True},
                       "outputs": [{"name": "labels"}, {"name": "scores", "parameters": {"binary_data": False}}]})
    assert req.binary == {"labels"}
    assert isinstance(render(req, RESULTS, model_name="m", model_version="1"), BinaryAnswer)
    for params in ({}, {"binary_data_output": False}):  # JSON, as before
        answer = render(read_oip_v2({"inputs": inputs, "parameters": params}), RESULTS, model_name="m",
                        model_version="1")
        assert isinstance(answer, str) and answer_headers(answer) == {"content-type": "application/json"}


@pytest.mark.parametrize("body,match", [
    ({"parameters": {"binary_data_output": "yes"}}, "parameters.binary_data_output must be true or false"),
    ({"outputs": [{"name": "labels", "parameters": {"binary_data": 1}}]},
     'output "labels": parameters.binary_data must be true or false'),
    ({"outputs": [{"name": "labels"}, {"name": "labels", "parameters": {"binary_data": False}}]},
     "names an output more than once"),
])
def test_a_bad_binary_flag_or_a_repeated_output_is_a_400(body, match):
    _, err, _ = read_row(oip_row({}, **body), {}, **ROW)
    assert isinstance(err, RequestError) and err.status == 400 and match in str(err), err


def test_a_grpc_call_is_answered_in_json_whatever_it_asks():
    """TorchServe turns the JSON answer of its OIP gRPC service into a ModelInferResponse: binary has no place."""
    row = oip_row({}, outputs=[{"name": "labels", "parameters": {"binary_data": True}}])
    _, req, _ = read_row(row, {"body": {"content-type": "application/json"}}, **ROW)
    assert req.binary == frozenset()
    answer = render(req, RESULTS[:1], model_name="m", model_version="1")
    assert isinstance(answer, str) and answer_headers(answer, grpc=True) == {"content-type": "application/json",
                                                                             "ts_stream_next": "false"}
    _, req, _ = read_row(row, {"Host": "127.0.0.1"}, **ROW)  # the same over HTTP
    assert req.binary == {"labels"}


def test_too_many_images_are_refused_before_any_is_decoded(monkeypatch):
    """A shape, a JSON data list or binary BYTES elements beyond max_images: 413 without decoding one (a 24 KB
    gzipped request of 3.3 million one-byte elements held a worker for 4.7 s before its 413)."""
    decoded = []
    monkeypatch.setattr("inference.oip._image_bytes", lambda e: decoded.append(e) or e)
    elements = (struct.pack("<I", 1) + b"A") * 100_000
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(elements)}}]}).encode()
    cases = [({"body": bytearray(head + elements)}, {"Inference-Header-Content-Length": str(len(head))}),
             (oip_row({"shape": [1], "data": [B64] * 100_000}), {}),
             (oip_row({"shape": [5], "data": [B64] * 5}), {})]
    for row, headers in cases:
        _, err, _ = read_row(row, headers, **ROW)
        assert isinstance(err, RequestError) and err.status == 413 and "the limit is 4" in str(err), err
    assert decoded == []
    _, err, _ = read_row({"body": {"instances": [B64] * 100_000}}, {}, **ROW)  # KServe v1 alike
    assert isinstance(err, RequestError) and err.status == 413 and str(err).startswith("100000 images")


def test_requests_triton_refuses_or_reads_otherwise_are_answered_as_triton_does():
    """Bytes after a JSON-data input (Triton: "unexpected additional input data"), a header length of 0 (Triton:
    the whole body is JSON), parameters that are not objects, a shape of no element, and an id that is not
    valid Unicode (echoed, it made the 200 unreadable to tritonclient's strict JSON parser)."""
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}]}).encode()
    _, err, _ = read_row({"body": bytearray(body + b"junk")}, {"Inference-Header-Content-Length": str(len(body))},
                         **ROW)
    assert isinstance(err, RequestError) and "4 bytes follow the inference header" in str(err), err
    _, req, _ = read_row({"body": bytearray(body)}, {"Inference-Header-Content-Length": "0"}, **ROW)
    assert req.images == [PNG]
    for row, where in ((oip_row({}, parameters=["topk", 3]), '"parameters"'),
                       (oip_row({"parameters": "binary"}), 'input "image": "parameters"'),
                       (oip_row({}, outputs=[{"name": "labels", "parameters": [1]}]), 'output "labels": "parameters"')):
        _, err, _ = read_row(row, {}, **ROW)
        assert isinstance(err, RequestError) and err.status == 400 and f"{where} must be a JSON object" in str(err)
    _, err, _ = read_row(oip_row({"shape": [0], "data": []}), {}, **ROW)
    assert "holds no image" in str(err)
    _, err, _ = read_row(oip_row({}, id="\ud800"), {}, **ROW)
    assert isinstance(err, RequestError) and "valid Unicode" in str(err)
    _, req, _ = read_row(oip_row({}, id="photo-é-✓"), {}, **ROW)
    assert req.id == "photo-é-✓"


def test_topk_beside_classification_is_judged_as_any_topk():
    """parameters.topk was held to a stricter rule next to a class_count ("3" refused) and a looser one (50 of
    3 classes silently cut): now one rule, parse_topk's."""
    cls = [{"name": "scores", "parameters": {"classification": 2}}]
    for topk, want in (("3", 3), (3.0, 3), (1, 2), (None, 2)):
        _, req, k = read_row(oip_row({}, outputs=cls, parameters={"topk": topk}), {}, **ROW)
        assert isinstance(req, Request) and k == want, (topk, req)
    for topk in (50, "abc", 0, True):
        _, err, _ = read_row(oip_row({}, outputs=cls, parameters={"topk": topk}), {}, **ROW)
        assert isinstance(err, RequestError) and err.error == "bad top-k", (topk, err)


def test_a_bad_gzip_body_with_tritons_binary_header_gets_the_oip_error():
    headers = {"Inference-Header-Content-Length": "10", "Content-Encoding": "gzip"}
    protocol, err, _ = read_row({"body": bytearray(b"not gzip at all")}, headers, **ROW)
    assert protocol == OIP_V2 and isinstance(err, RequestError) and err.error == "bad encoding"


def test_parameters_tta_says_which_tta_ran_when_the_first_image_had_none():
    """Adaptive TTA: image 0 confident (no TTA), image 1 not: the answer said tta "none" with one applied."""
    results = [{"predictions": RESULTS[0]["predictions"], "tta": "none", "tta_applied": False},
               {"predictions": RESULTS[1]["predictions"], "tta": "flip", "tta_applied": True}]
    body = oip_answer(Request([b"a", b"b"], multi=True, protocol=OIP_V2), results, model_name="m", model_version="1")
    assert body["parameters"] == {"tta": "flip", "tta_applied_count": 1}
    none = [{**r, "tta": "none", "tta_applied": False} for r in results]
    body = oip_answer(Request([b"a", b"b"], multi=True, protocol=OIP_V2), none, model_name="m", model_version="1")
    assert body["parameters"] == {"tta": "none", "tta_applied_count": 0}
