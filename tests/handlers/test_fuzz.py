"""Bounded fuzzing of what reads untrusted bytes: request rows and image decoding. Whatever arrives,
the only exceptions are the per-request errors the handler turns into a 4xx."""
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from inference.images import ImageError, decode_rgb
from inference.protocols import read_row
from inference.requests import RequestError, parse_topk, read_request

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 9), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 30)).save(buf, format="JPEG")
    return buf.getvalue()


SEEDS = [_png(), _jpeg()]


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos: pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated_images()))
def test_decoding_arbitrary_bytes_only_raises_image_errors(data):
    try:
        image = decode_rgb(data, max_pixels=4_000_000)
    except ImageError as e:
        assert e.status in (400, 413, 415) and str(e)
        return
    assert image.ndim == 3 and image.shape[0] == 3 and image.dtype.is_floating_point is False


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                              max_size=4), max_leaves=12)
rows = st.one_of(
    st.fixed_dictionaries({"body": st.one_of(st.binary(max_size=64), st.text(max_size=64), json_values)}),
    st.dictionaries(st.text(max_size=8), st.one_of(st.binary(max_size=32), st.text(max_size=8)), max_size=4),
)


@FUZZ
@given(rows, st.one_of(st.none(), st.sampled_from(["application/json", "image/png", "text/plain"])))
def test_reading_arbitrary_request_rows_only_raises_request_errors(row, ctype):
    try:
        req = read_request(row, max_images=8, content_type=ctype)
    except RequestError as e:
        assert 400 <= e.status < 500 and str(e)
        return
    assert 1 <= len(req.images) <= 8 and all(isinstance(i, (bytes, bytearray)) and i for i in req.images)


@FUZZ
@given(st.one_of(json_values, st.binary(max_size=8)), st.one_of(st.none(), st.text(max_size=6)))
def test_topk_from_anywhere_is_validated(body_value, header_value):
    headers = {} if header_value is None else {"X-Top-K": header_value}
    try:
        k = parse_topk(headers, default=5, num_classes=10, body_value=body_value)
    except RequestError as e:
        assert e.status == 400
        return
    assert 1 <= k <= 10


oip_like = st.fixed_dictionaries({"inputs": st.one_of(json_values, st.lists(st.dictionaries(
    st.sampled_from(["name", "shape", "datatype", "data", "parameters"]), json_values, max_size=5), max_size=2))},
    optional={"outputs": json_values, "parameters": json_values, "id": json_values})
kserve_like = st.fixed_dictionaries({"instances": json_values}, optional={"parameters": json_values, "topk": json_values})


@FUZZ
@given(st.one_of(rows, st.fixed_dictionaries({"body": st.one_of(oip_like, kserve_like)})),
       st.dictionaries(st.sampled_from(["content-type", "inference-header-content-length", "X-Top-K"]),
                       st.text(max_size=12), max_size=3))
def test_reading_any_protocol_never_raises_and_errors_are_4xx(row, headers):
    """TorchServe answers the whole batch with 503 when the handler raises: read_row must not, and what it
    refuses is the client's 4xx (a 500 here would be a bug of ours that the fuzzing found)."""
    protocol, req, topk = read_row(row, headers, max_images=8, default_topk=2, max_topk=5)
    if isinstance(req, RequestError):
        assert 400 <= req.status < 500 and str(req), req
    else:
        assert 1 <= len(req.images) <= 8 and 1 <= topk <= 5
