"""inference.explain_requests: one explanation request's options, limits and answer in its protocol."""
import base64
import gzip
import io
import json

import pytest
import torch
from PIL import Image

from inference.explain_requests import explain_request, overlay_requested
from inference.protocols import KSERVE_V1, OIP_V2, read_row
from inference.requests import Request, RequestError
from inference.settings import HandlerSettings
from tests.inference.test_explain import GRID, HOT, SIZE, Counting, images_with_hot_cell, region_model

B64 = base64.b64encode(b"x").decode()


def read(row: dict, headers: dict) -> Request:
    """The request as the handler reads it (inflated, JSON parsed whatever its content type)."""
    _, req, _ = read_row(row, headers, max_images=4, default_topk=1, max_topk=3)
    assert isinstance(req, Request), req
    return req


@pytest.mark.parametrize("headers,row,default,expected", [
    ({}, {"body": bytearray(b"x")}, False, False),
    ({}, {"body": bytearray(b"x")}, True, True),
    ({"X-Explain-Overlay": "true"}, {"body": bytearray(b"x")}, False, True),
    ({"x-explain-overlay": "0"}, {"body": bytearray(b"x")}, True, False),
    ({}, {"body": {"data": B64, "overlay": True}}, False, True),
    ({"X-Explain-Overlay": "true"}, {"body": {"instances": [B64], "parameters": {"overlay": False}}}, False, False),
    # JSON that arrives as bytes: compressed, or sent without a JSON content type
    ({"Content-Encoding": "gzip"}, {"body": bytearray(gzip.compress(json.dumps({"data": B64, "overlay": True}
                                                                               ).encode()))}, False, True),
    ({"Content-Type": "text/plain"}, {"body": bytearray(json.dumps({"instances": [B64], "parameters": {
        "overlay": "yes"}}).encode())}, False, True),
])
def test_overlay_requested_by_field_header_or_default(headers, row, default, expected):
    assert overlay_requested(headers, read(row, headers), default=default) is expected


def test_a_bad_overlay_value_is_a_400():
    with pytest.raises(RequestError, match="X-Explain-Overlay must be true or false") as e:
        overlay_requested({"X-Explain-Overlay": "maybe"}, Request([b"x"]), default=False)
    assert e.value.status == 400


SETTINGS = HandlerSettings(input_size=SIZE, explain_grid=GRID, explain_views_per_forward=8)
CLASSES = ["hot", "two", "three"]


def _answer(req, images=None, **kwargs):
    return json.loads(explain_request(kwargs.pop("forward", region_model), images_with_hot_cell(len(req.images))
                                      if images is None else images, req, settings=kwargs.pop("settings", SETTINGS),
                                      output=kwargs.pop("output", "logits"), class_names=CLASSES, model_name="m",
                                      model_version="1", **kwargs))


def test_explain_request_answers_in_the_request_protocol():
    one = _answer(Request([b"img"]))
    assert one["class"] == "hot" and one["index"] == 0 and one["grid_size"] == GRID and one["method"] == "occlusion"
    assert len(one["grid"]) == GRID and all(len(row) == GRID for row in one["grid"])
    assert "overlay_png_base64" not in one and one["model"] == "m" and one["version"] == "1"
    many = _answer(Request([b"a", b"b"], multi=True))
    assert isinstance(many, list) and len(many) == 2
    v1 = _answer(Request([b"a"], multi=True, protocol=KSERVE_V1), headers={"X-Explain-Overlay": "yes"})
    assert list(v1) == ["explanations"] and len(v1["explanations"]) == 1
    png = base64.b64decode(v1["explanations"][0]["overlay_png_base64"])
    assert Image.open(io.BytesIO(png)).size == (SIZE, SIZE)


def test_an_explanation_over_max_response_bytes_is_a_413():
    """Overlays are base64 PNGs: an answer TorchServe would refuse (dropping the worker and its batch) is the
    request's own 413."""
    small = HandlerSettings(input_size=SIZE, explain_grid=GRID, explain_views_per_forward=8, max_response_bytes=1024)
    with pytest.raises(RequestError, match="max_response_bytes") as e:
        _answer(Request([b"a", b"b", b"c"], multi=True), settings=small, headers={"X-Explain-Overlay": "yes"})
    assert e.value.status == 413


def test_explain_request_crops_the_canvas_center():
    canvas = torch.zeros((1, 3, SIZE + 8, SIZE + 8), dtype=torch.uint8)
    canvas[:, :, 4:SIZE + 4, 4:SIZE + 4] = images_with_hot_cell(1)
    forward = Counting(region_model)
    body = _answer(Request([b"a"]), images=canvas, crop_size=SIZE, forward=forward)
    assert {tuple(x.shape[-2:]) for x in forward.inputs} == {(SIZE, SIZE)}
    assert divmod(max(range(GRID * GRID), key=lambda k: body["grid"][k // GRID][k % GRID]), GRID) == HOT


def test_explain_request_bounds_and_refusals():
    forward = Counting(region_model)
    _answer(Request([b"a"] * 3, multi=True), forward=forward)
    assert max(forward.sizes) <= SETTINGS.explain_views_per_forward
    capped = HandlerSettings(input_size=SIZE, explain_grid=GRID, explain_views_per_forward=64, max_forward_batch=5)
    forward = Counting(region_model)
    _answer(Request([b"a"]), forward=forward, settings=capped)
    assert max(forward.sizes) <= 5
    fine = _answer(Request([b"a"]), images=images_with_hot_cell(1)[:, :, :10, :10],
                   settings=HandlerSettings(input_size=10, explain_grid=16))
    assert fine["grid_size"] == 10                              # never a cell under one pixel
    for req, kwargs, status in ((Request([b"a"] * 5, multi=True), {}, 413),
                                (Request([b"a"], protocol=OIP_V2), {}, 501),
                                (Request([b"a"]), {"output": "topk"}, 501)):
        with pytest.raises(RequestError) as e:
            _answer(req, images=images_with_hot_cell(1), **kwargs)
        assert e.value.status == status


def test_a_failing_model_is_this_requests_500():
    def broken(x):
        raise RuntimeError("out of memory")
    with pytest.raises(RequestError, match="out of memory") as e:
        _answer(Request([b"a"]), forward=broken)
    assert e.value.status == 500 and e.value.error == "inference failed"
