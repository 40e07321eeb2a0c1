import base64
import json

import numpy as np
import pytest
import torch

from inference.requests import RequestError, parse_topk, read_request
from inference.responses import error_body, topk_predictions
from inference.threads import worker_threads
from tests.conftest import encode, pattern_image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_raw_body_is_one_image():
    req = read_request({"body": bytearray(b"abc")})
    assert req.images == [b"abc"] and not req.multi and req.topk is None


def test_json_single_list_and_topk_field():
    req = read_request({"body": {"data": b64(b"png!"), "topk": 3}})
    assert req.images == [b"png!"] and not req.multi and req.topk == 3
    req = read_request({"body": {"data": [b64(b"a"), b64(b"b")]}})
    assert req.images == [b"a", b"b"] and req.multi
    req = read_request({"body": [b64(b"a"), {"data": b64(b"b")}]})
    assert req.images == [b"a", b"b"] and req.multi


def test_multipart_files_in_order_and_topk_field():
    req = read_request({"file": bytearray(b"img")})
    assert req.images == [b"img"] and not req.multi
    req = read_request({"data": bytearray(b"one"), "topk": bytearray(b"2"), "second": bytearray(b"two")})
    assert req.images == [b"one", b"two"] and req.multi and req.topk == b"2"


@pytest.mark.parametrize("row,status,match", [
    ({}, 400, "empty request"),
    ({"body": bytearray()}, 400, "empty body"),
    ({"body": "some text"}, 415, "arrived as text"),
    ({"body": {"data": "@@not base64@@"}}, 400, "not valid base64"),
    ({"body": {"image": "x"}}, 400, "expected a base64 string"),
    ({"body": {"data": [b64(b"a"), 7]}}, 400, r"data\[1\]"),
    ({"body": []}, 400, "no image"),
    ({"topk": bytearray(b"3")}, 400, "no image found"),
])
def test_read_request_errors(row, status, match):
    with pytest.raises(RequestError, match=match) as e:
        read_request(row)
    assert e.value.status == status


def test_invalid_json_arrives_as_bytes_and_is_named():
    with pytest.raises(RequestError, match="malformed JSON") as e:
        read_request({"body": bytearray(b'{"data": ')}, content_type="application/json; charset=utf-8")
    assert e.value.status == 400 and e.value.error == "bad json"


def test_too_many_images_is_413():
    with pytest.raises(RequestError, match="limit is 2") as e:
        read_request({"body": {"data": [b64(b"a")] * 3}}, max_images=2)
    assert e.value.status == 413


def test_topk_header_is_case_insensitive_and_validated():
    assert parse_topk({}, default=5, num_classes=10) == 5
    assert parse_topk({}, default=5, num_classes=3) == 3
    assert parse_topk({"x-top-k": "2"}, default=5, num_classes=10) == 2
    assert parse_topk({"X-TOP-K": b"7"}, default=5, num_classes=10) == 7
    for bad in ("0", "-1", "11", "abc", "2.5", ""):
        with pytest.raises(RequestError, match="X-Top-K"):
            parse_topk({"X-Top-K": bad}, default=5, num_classes=10)


def test_body_topk_wins_over_the_header_and_is_validated():
    assert parse_topk({"X-Top-K": "2"}, default=5, num_classes=10, body_value=4) == 4
    assert parse_topk({}, default=5, num_classes=10, body_value=b"3") == 3
    for bad in (0, 11, "x", 2.5, True, [1]):
        with pytest.raises(RequestError, match="topk"):
            parse_topk({}, default=5, num_classes=10, body_value=bad)


def test_topk_predictions_per_request_k():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    out = topk_predictions(*probs.topk(3, dim=1), [1, 3], ["a", "b", "c"])
    assert out[0] == [{"class": "b", "index": 1, "confidence": pytest.approx(0.7)}]
    assert [p["class"] for p in out[1]] == ["a", "c", "b"]


def test_confidences_keep_every_float32_digit_in_the_fewest_characters():
    probs = torch.softmax(torch.tensor([[30.0, 0.0, 1.3, -1.0], [0.3, 0.1, 0.2, 0.25]]), dim=1)
    values, indices = probs.topk(4, dim=1)
    out = topk_predictions(values, indices, [4, 4], list("abcd"))
    got = np.array([[p["confidence"] for p in row] for row in out], dtype=np.float32)
    assert np.array_equal(got, values.numpy())  # FP32 scores (OIP binary or JSON) read back bit for bit
    assert 0 < out[0][-1]["confidence"] < 1e-12  # e**-31: six decimals wrote 0.0
    assert json.dumps(out[1][0]["confidence"]) == str(np.float32(values[1, 0]))  # e.g. 0.2756 .. not 0.27560..0621
    bf16 = topk_predictions(values.bfloat16(), indices, [1, 1], list("abcd"))  # a reduced-precision graph's output
    assert bf16[0][0]["confidence"] == pytest.approx(1.0)


def test_error_body_is_json():
    assert json.loads(error_body("bad image", "not an image")) == {"error": "bad image", "detail": "not an image",
                                                                   "code": 400}


def test_worker_threads_never_oversubscribe():
    assert worker_threads(3, workers=2, env={"OMP_NUM_THREADS": "8"}, cores=16) == 3      # model-config wins
    assert worker_threads(0, workers=2, env={"OMP_NUM_THREADS": "2"}, cores=64) == 2      # a container's limit
    assert worker_threads(0, workers=2, env={}, cores=16) == 8                            # cores / workers
    assert worker_threads(0, workers=4, env={"OMP_NUM_THREADS": "x"}, cores=2) == 1       # never 0


def test_a_compressed_body_is_inflated_within_its_budget():
    import gzip
    import zlib

    from inference.requests import inflate
    data = b"\x89PNG" + bytes(range(256)) * 40
    assert inflate(data, {"Content-Type": "image/png"}, max_bytes=100) is data  # not compressed: as it came
    for coding, packed in (("gzip", gzip.compress(data)), ("deflate", zlib.compress(data)),
                           ("deflate", zlib.compress(data)[2:-4])):  # a bare deflate stream, as some clients send
        assert inflate(packed, {"Content-Encoding": coding}, max_bytes=len(data)) == data
    bomb = gzip.compress(b"\0" * (50 << 20))  # 50 MiB of zeros in about 50 KB
    with pytest.raises(RequestError, match="inflates to more than 1048576 bytes") as e:
        inflate(bomb, {"content-encoding": "gzip"}, max_bytes=1 << 20)
    assert e.value.status == 413
    with pytest.raises(RequestError, match="is cut off"):
        inflate(gzip.compress(data)[:-20], {"content-encoding": "gzip"}, max_bytes=1 << 20)
    with pytest.raises(RequestError, match="not valid gzip data"):
        inflate(data, {"content-encoding": "gzip"}, max_bytes=1 << 20)
    with pytest.raises(RequestError, match="'br' is not supported") as e:
        inflate(data, {"content-encoding": "br"}, max_bytes=1 << 20)
    assert e.value.status == 415


def test_a_form_of_two_file_fields_is_answered_as_a_list_even_with_one_left_empty():
    """A browser form with two file inputs, one left empty: the answer's shape (a list) follows the form."""
    req = read_request({"a": bytearray(b"\x89PNG..."), "b": bytearray()}, content_type="multipart/form-data; b=x")
    assert req.images == [b"\x89PNG..."] and req.multi
    assert not read_request({"a": bytearray(b"\x89PNG...")}, content_type="multipart/form-data; b=x").multi


def test_line_wrapped_base64_is_read():
    data = bytes(range(256)) * 3
    wrapped = base64.encodebytes(data).decode()  # a newline every 76 characters
    assert "\n" in wrapped and read_request({"body": {"data": wrapped}}).images == [data]
    with pytest.raises(RequestError, match="not valid base64"):
        read_request({"body": {"data": wrapped.replace("A", "*", 1)}})


def test_an_error_quotes_only_a_few_dozen_characters_of_what_was_sent():
    """An error body never grows with the request: TorchServe drops the worker, and its whole batch, on an answer
    over max_response_size, and json.dumps writes 'é' as six bytes."""
    for value in ("é" * 3_000_000, [1] * 1_000_000, 10 ** 4000, {"k": "x" * 10**6}):
        with pytest.raises(RequestError) as e:
            parse_topk({}, default=1, num_classes=3, body_value=value)
        assert len(error_body(e.value.error, str(e.value))) < 600, str(e.value)[:200]  # é: 6 bytes in JSON


def test_a_form_field_named_like_a_header_does_not_shadow_it():
    """TorchServe 0.12 puts each form field's {"content-type": ...} under the field's name among the request's
    headers, before the real ones: a field named content-type or x-top-k is not that header."""
    from inference.protocols import read_row
    png = encode(pattern_image("circle", size=20, seed=1), "PNG")
    headers = {"content-type": {"content-type": "image/png"}, "x-top-k": {"content-type": None},
               "Content-Type": "multipart/form-data; boundary=x", "X-Top-K": "2"}
    protocol, req, topk = read_row({"content-type": bytearray(png), "x-top-k": bytearray(b"junk")}, headers,
                                   max_images=4, default_topk=1, max_topk=3)
    assert not isinstance(req, RequestError), req
    assert len(req.images) == 1 and topk == 2


def test_concatenated_gzip_members_are_read_and_trailing_garbage_is_a_400():
    import gzip

    from inference.requests import DEFAULT_MAX_INFLATED_BYTES, inflate
    assert DEFAULT_MAX_INFLATED_BYTES == 16 << 20  # config.properties' max_request_size: no more once inflated
    a, b = b"\x89PNG" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 30
    assert inflate(gzip.compress(a) + gzip.compress(b), {"Content-Encoding": "gzip"}, max_bytes=1 << 20) == a + b
    with pytest.raises(RequestError, match="inflates to more than") as e:  # the budget spans the members
        inflate(gzip.compress(a) + gzip.compress(b), {"Content-Encoding": "gzip"}, max_bytes=len(a) + 10)
    assert e.value.status == 413
    with pytest.raises(RequestError, match="more than 64 members"):  # empty members cost time, no bytes
        inflate(gzip.compress(b"") * 100_000, {"Content-Encoding": "gzip"}, max_bytes=1 << 20)
    with pytest.raises(RequestError, match="5 bytes after its compressed data") as e:
        inflate(gzip.compress(a) + b"junk!", {"Content-Encoding": "gzip"}, max_bytes=1 << 20)
    assert e.value.status == 400
