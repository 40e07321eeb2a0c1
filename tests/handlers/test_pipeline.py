import base64
import json

import pytest
import torch

from handlers.pipeline import RequestError, error_body, parse_topk, read_body, topk_predictions


def test_read_body_raw_multipart_and_base64_json():
    assert read_body({"body": bytearray(b"abc")}) == b"abc"
    assert read_body({"data": b"xyz"}) == b"xyz"
    assert read_body({"file": bytearray(b"img"), "note": "text"}) == b"img"  # multipart field of any name
    assert read_body({"body": {"data": base64.b64encode(b"png!").decode()}}) == b"png!"


@pytest.mark.parametrize("row,status,match", [
    ({}, 400, "empty request"),
    ({"body": "some text"}, 415, "sent as text"),
    ({"body": {"data": "@@not base64@@"}}, 400, "not valid base64"),
    ({"body": {"image": "x"}}, 400, "JSON bodies must look like"),
    ({"note": "only text"}, 400, "no image found"),
])
def test_read_body_errors(row, status, match):
    with pytest.raises(RequestError, match=match) as e:
        read_body(row)
    assert e.value.status == status


def test_topk_header_is_case_insensitive_and_validated():
    assert parse_topk({}, default=5, num_classes=10) == 5
    assert parse_topk({}, default=5, num_classes=3) == 3
    assert parse_topk({"x-top-k": "2"}, default=5, num_classes=10) == 2
    assert parse_topk({"X-TOP-K": b"7"}, default=5, num_classes=10) == 7
    for bad in ("0", "-1", "11", "abc", "2.5"):
        with pytest.raises(RequestError, match="X-Top-K"):
            parse_topk({"X-Top-K": bad}, default=5, num_classes=10)


def test_topk_predictions_per_request_k():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    out = topk_predictions(*probs.topk(3, dim=1), [1, 3], ["a", "b", "c"])
    assert out[0] == [{"class": "b", "index": 1, "confidence": pytest.approx(0.7)}]
    assert [p["class"] for p in out[1]] == ["a", "c", "b"]


def test_error_body_is_json():
    assert json.loads(error_body("bad image", "not an image")) == {"error": "bad image", "detail": "not an image"}
