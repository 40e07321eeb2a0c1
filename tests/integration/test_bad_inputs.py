"""The bad-input matrix against a real TorchServe: every bad request gets a clear 4xx with a JSON body
naming the problem, a good request sent in the same batch window still gets its 200, and the server
keeps serving. Unusual but valid images are classified."""
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode, pattern_image
from tools.client import predict

pytestmark = pytest.mark.slow
GOOD = encode(pattern_image("circle", size=30))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    data = encode(pattern_image("vertical", size=256), "JPEG")
    return data[: len(data) // 2]


# (name, body, content type, headers, expected status, words the JSON error must contain)
BAD = [
    ("empty body", b"", "image/png", {}, 400, "empty"),
    ("truncated JPEG", _truncated_jpeg(), "image/jpeg", {}, 400, "cannot decode"),
    ("random bytes", np.random.default_rng(0).bytes(5000), "image/jpeg", {}, 400, "not an image"),
    ("text file", b"hello, I am a text file\n", "text/plain", {}, 415, "text"),
    ("HTML", b"<html><body>hi</body></html>", "text/html", {}, 415, "text"),
    ("HTML sent as an image", b"<html><body>hi</body></html>", "image/png", {}, 400, "not an image"),
    ("decompression bomb", _bomb(), "image/png", {}, 413, "pixels"),
    ("bad base64", json.dumps({"data": "%%%not-base64%%%"}).encode(), "application/json", {}, 400, "base64"),
    ("malformed JSON", b'{"data": "abc', "application/json", {}, 400, "malformed JSON"),
    ("top-k 0", GOOD, "image/png", {"X-Top-K": "0"}, 400, "X-Top-K"),
    ("top-k -1", GOOD, "image/png", {"X-Top-K": "-1"}, 400, "X-Top-K"),
    ("top-k huge", GOOD, "image/png", {"X-Top-K": "100000"}, 400, "X-Top-K"),
    ("top-k not a number", GOOD, "image/png", {"X-Top-K": "five"}, 400, "X-Top-K"),
]


def _post(url, body, ctype, headers):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype, **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


@pytest.mark.parametrize("name,body,ctype,headers,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_while_a_good_neighbour_succeeds(server, name, body, ctype, headers, status, words):
    url = f"{server.url}/predictions/shapes"
    with ThreadPoolExecutor(2) as pool:  # sent together: one batch window (300 ms delay on this server)
        bad = pool.submit(_post, url, body, ctype, headers)
        good = pool.submit(_post, url, GOOD, "image/png", {})
        (code, content_type, raw), (good_code, _, good_raw) = bad.result(), good.result()
    assert code == status, raw
    assert content_type.startswith("application/json")
    err = json.loads(raw)
    assert set(err) == {"error", "detail", "code"} and err["code"] == status and words.lower() in (err["error"] + " " + err["detail"]).lower(), err
    assert good_code == 200 and json.loads(good_raw)["predictions"]


def _classify(server, data, ctype="image/png"):
    status, body = predict(server.url, "shapes", data, content_type=ctype, topk=3)
    assert status == 200, body
    return body["predictions"][0]["index"]


def test_unusual_but_valid_images_are_classified(server, eager):
    _, probs = eager
    rgb = Image.fromarray(pattern_image("vertical", size=30))
    rgba = rgb.convert("RGBA")
    gray = rgb.convert("L")
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, format="JPEG", quality=95)
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    for data, ctype in ((_png(rgba), "image/png"), (_png(gray), "image/png"), (cmyk.getvalue(), "image/jpeg"),
                        (_png(sixteen), "image/png"), (_png(Image.new("RGB", (1, 1), (200, 10, 10))), "image/png")):
        assert _classify(server, data, ctype) == int(probs([data]).argmax())


def test_exif_rotated_jpeg_is_classified_as_the_upright_image(server, eager):
    _, probs = eager
    upright = Image.fromarray(pattern_image("horizontal", size=30))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": undoes the ROTATE_90 (counter-clockwise) above
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    upright_jpeg = encode(np.asarray(upright), "JPEG", quality=95)
    assert _classify(server, buf.getvalue(), "image/jpeg") == int(probs([upright_jpeg]).argmax())


def test_body_over_max_request_size_is_413_from_the_frontend(server):
    """The frontend answers 413 from the Content-Length alone (config.properties: 16 MiB) and closes the
    connection, so the client sends the headers and a first chunk, then reads the answer."""
    import socket
    port = int(server.url.rsplit(":", 1)[1])
    size = 17 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /predictions/shapes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode() + b"\xff\xd8\xff" + b"\0" * 65536)
        reply = sock.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert _classify(server, GOOD) >= 0  # still serving


def test_what_torchserves_frontend_answers_before_the_handler(server):
    """README "Errors from TorchServe itself": TorchServe's own shape ({"code", "type", "message"}), and the one
    trap of curl's default: ``--data-binary @photo.jpg`` without a Content-Type sends
    application/x-www-form-urlencoded, which the frontend parses as a form and answers 500 before the handler
    is called; the same bytes PUT (``curl -T``), posted without a content type (requests) or as a multipart
    file (``curl -F data=@``) are classified."""
    import requests
    url = f"{server.url}/predictions/shapes"
    r = requests.post(url, data=GOOD, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 500 and r.json()["type"] == "ErrorDataDecoderException", r.text[:300]
    for answer in (requests.put(url, data=GOOD, timeout=60), requests.post(url, data=GOOD, timeout=60),
                   requests.post(url, files={"data": ("a.png", GOOD, "image/png")}, timeout=60)):
        assert answer.status_code == 200 and answer.json()["predictions"], answer.text[:300]
    r = requests.post(f"{server.url}/predictions/no_such_model", data=GOOD, headers={"Content-Type": "image/png"},
                      timeout=60)
    assert r.status_code == 404 and r.json() == {"code": 404, "type": "ModelNotFoundException",
                                                 "message": "Model not found: no_such_model"}


def test_unknown_model_and_wrong_method(server):
    code, _, raw = _post(f"{server.url}/predictions/no_such_model", GOOD, "image/png", {})
    assert code == 404 and "no_such_model" in raw.decode()
    # TorchServe routes every method of /predictions/NAME to the handler: a GET or DELETE carries no
    # image, and the handler says so.
    for method in ("GET", "DELETE"):
        req = urllib.request.Request(f"{server.url}/predictions/shapes", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and json.loads(e.value.read())["error"] in ("empty body", "missing image")
    assert _classify(server, GOOD) >= 0
