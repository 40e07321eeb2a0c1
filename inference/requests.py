"""Reading one request of a TorchServe batch: its images and its per-request options (top-k).

Pure functions, tested without TorchServe. A problem is a :class:`RequestError` with the HTTP status
to answer, so that one bad request never fails its batch neighbours.
"""
from __future__ import annotations

import base64
import binascii
import json
import reprlib
import zlib
from dataclasses import dataclass

TOPK_HEADER = "x-top-k"
TOPK_FIELD = "topk"
TORCHSERVE = "torchserve"  # the protocol of TorchServe's own request forms read here (see inference.protocols)
OVERLAY_FIELD = "overlay"  # explanations: a JSON body's (or KServe v1 parameters') overlay option
DEFAULT_MAX_IMAGES = 32  # images of one request (handler setting max_images_per_request)
DEFAULT_MAX_INFLATED_BYTES = 16 << 20  # a compressed body's bytes once inflated: config.properties' max_request_size
DEFAULT_MAX_RESPONSE_BYTES = 6_553_500  # TorchServe's default max_response_size (config.properties: 16 MiB)

# A client's value quoted in an error message: a few dozen characters at most, so that an error body never
# grows with what was sent (an answer over TorchServe's max_response_size costs the worker and its batch).
_SHOWN = reprlib.Repr()  # Python 3.11's takes no arguments
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxlevel = 60, 60, 40, 6, 4, 2


def shown(value) -> str:
    """``repr(value)`` cut short (:data:`_SHOWN`): what an error message quotes of a client's value."""
    try:
        return _SHOWN.repr(value)
    except ValueError:  # an int of more digits than Python formats (4300)
        return "<a very large number>"


class RequestError(ValueError):
    """A per-request problem: answered with ``status`` and a JSON body, never failing the batch."""

    def __init__(self, message: str, *, status: int = 400, error: str = "bad request"):
        super().__init__(message)
        self.status = status
        self.error = error


@dataclass
class Request:
    """One request: its images, whether it gets a list back, a ``topk`` from its body, the protocol it
    speaks (``inference.protocols``), and for the Open Inference Protocol its ``id`` and wanted outputs."""
    images: list[bytes | bytearray]
    multi: bool = False
    topk: object = None
    protocol: str = TORCHSERVE
    id: str | None = None
    outputs: tuple[str, ...] | None = None
    classification: dict[str, int] | None = None  # OIP outputs asked as Triton's classification: name -> count
    binary: frozenset[str] = frozenset()  # OIP outputs to answer in Triton's binary form (inference.oip)
    overlay: object = None  # the JSON body's overlay option (explanations), as sent


def check_count(n: int, max_images: int) -> None:
    """413 for a request of more than ``max_images`` images: checked before any of them is decoded."""
    if n > max_images:
        raise RequestError(f"{n} images in one request; the limit is {max_images}", status=413, error="too many images")


def inflate(body: bytes | bytearray, headers: dict | None, *, max_bytes: int) -> bytes | bytearray:
    """``body`` as sent, or inflated when its ``Content-Encoding`` is gzip or deflate (TorchServe 0.12's frontend
    does not inflate); more than ``max_bytes`` once inflated is a 413, whatever the compression ratio."""
    coding = (header(headers, "content-encoding") or "").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise RequestError(f"Content-Encoding {shown(coding)} is not supported: send gzip, deflate or none", status=415,
                           error="unsupported encoding")
    # gzip: its header (wbits 31), member after member as gzip(1) reads a concatenated file; deflate: zlib's
    # wrapper as HTTP says, or a bare stream as some clients send
    for wbits in ((31,) if "gzip" in coding else (15, -15)):
        try:
            return _inflate(bytes(body), wbits, coding, max_bytes)
        except zlib.error as e:
            reason = str(e)
    raise RequestError(f"the body is not valid {coding} data ({reason})", error="bad encoding")


MAX_JSON_VALUES = 10_000  # objects, arrays and items in a JSON body we parse: a request holds a few dozen


def parse_json(raw: bytes | bytearray):
    """``raw`` parsed as JSON (UTF-8, a BOM allowed), after counting its objects, arrays and separators at C
    speed: a 16 KB gzip body inflates to 5 million ``{}`` that ``json.loads`` would build (1.3 s, +430 MB)
    before any check could look at them. Raises :class:`RequestError` (413) past :data:`MAX_JSON_VALUES`,
    ``ValueError``/``RecursionError`` as ``json.loads`` does."""
    if (n := raw.count(b"{") + raw.count(b"[") + raw.count(b",")) > MAX_JSON_VALUES:
        raise RequestError(f"the JSON body holds {n} objects, arrays and items; at most {MAX_JSON_VALUES} are read: "
                           "send each image as one base64 string or as raw bytes", status=413,
                           error="request too large")
    return json.loads(bytes(raw).decode("utf-8-sig"))


MAX_GZIP_MEMBERS = 64  # gzip(1) of a few files concatenated; thousands of empty members only cost time


def _inflate(data: bytes, wbits: int, coding: str, max_bytes: int) -> bytes:
    parts, size = [], 0
    while True:
        if len(parts) == MAX_GZIP_MEMBERS:
            raise RequestError(f"the {coding} body has more than {MAX_GZIP_MEMBERS} members", error="bad encoding")
        inflater = zlib.decompressobj(wbits)
        part = inflater.decompress(data, max_bytes - size + 1)
        size += len(part)
        parts.append(part)
        if size > max_bytes:
            raise RequestError(f"the {coding} body inflates to more than {max_bytes} bytes", status=413,
                               error="request too large")
        if not inflater.eof:
            raise RequestError(f"the {coding} body is cut off", error="bad encoding")
        data = inflater.unused_data
        if not data:
            return b"".join(parts)
        if wbits != 31 or data[:2] != b"\x1f\x8b":  # bytes after the stream that are not another gzip member
            raise RequestError(f"the {coding} body has {len(data)} bytes after its compressed data",
                               error="bad encoding")


def decode_b64(data, where: str) -> bytes:
    """The bytes of one base64-encoded image; ``where`` names it in the error."""
    if not isinstance(data, str):
        raise RequestError(f'{where}: expected a base64 string (JSON {{"data": "<base64 image>"}})', error="bad json")
    if "\n" in data or "\r" in data or " " in data:  # MIME-style lines (base64.encodebytes, `base64` without -w0)
        data = "".join(data.split())
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where} is not valid base64: {e}", error="bad base64") from None
    if not decoded:
        raise RequestError(f"{where} is empty: expected a base64-encoded image", error="empty body")
    return decoded


def _b64(item, where: str) -> bytes:
    return decode_b64(item.get("data") if isinstance(item, dict) else item, where)


def read_request(row: dict, *, max_images: int = DEFAULT_MAX_IMAGES, content_type: str | None = None,
                 field_types: dict[str, str] | None = None) -> Request:
    """The images of one TorchServe request row.

    * raw body (``{"body": bytes}``): one image;
    * JSON (TorchServe hands it over parsed): ``{"data": "<b64>", "topk": 3}``, ``{"data": ["<b64>", ...]}``
      or ``["<b64>", {"data": "<b64>"}, ...]`` -- a list gives a list back;
    * multipart form (``content_type`` ``multipart/form-data``, whatever its fields are named, ``body``
      too): every file field is an image (several give a list back); a ``topk`` field sets k. Text fields
      are not images: ``field_types`` (field name -> the content type TorchServe saw for it, when known)
      tells them apart, as TorchServe gives a file field its part's content type
      (``application/octet-stream`` when the part names none) and a text field none.
    """
    if not row:
        raise RequestError("empty request: send image bytes as the body, a multipart file field, or JSON "
                           '{"data": "<base64>"}', error="empty body")
    multipart = (content_type or "").split(";")[0].strip().lower() == "multipart/form-data"
    if "body" in row and not multipart:
        body = row["body"]
        if isinstance(body, (bytes, bytearray)):
            if not body:
                raise RequestError("empty body: expected the bytes of an image", error="empty body")
            if (content_type or "").split(";")[0].strip().lower() == "application/json":
                # TorchServe hands invalid JSON over as raw bytes
                raise RequestError('malformed JSON body: expected {"data": "<base64 image>"}', error="bad json")
            req = Request([body])
        elif isinstance(body, dict):
            data = body.get("data")
            if isinstance(data, list):
                check_count(len(data), max_images)
                req = Request([_b64(d, f"data[{i}]") for i, d in enumerate(data)], multi=True, topk=body.get(TOPK_FIELD))
            else:
                req = Request([_b64(body, '"data"')], topk=body.get(TOPK_FIELD))
        elif isinstance(body, list):
            check_count(len(body), max_images)
            req = Request([_b64(d, f"item {i}") for i, d in enumerate(body)], multi=True)
        elif isinstance(body, str):
            raise RequestError("the body arrived as text: send image bytes with an image/* content type, or JSON "
                               '{"data": "<base64 image>"}', status=415, error="unsupported media type")
        else:
            raise RequestError(f"unsupported body of type {type(body).__name__}", status=415,
                               error="unsupported media type")
    else:  # multipart: one key per form field
        text = {k for k, t in (field_types or {}).items() if not t}
        fields = [v for k, v in row.items() if k != TOPK_FIELD and k not in text and isinstance(v, (bytes, bytearray))]
        files = [v for v in fields if v]  # a browser sends a file input left empty as an empty field: skipped
        if not files:
            raise RequestError("no image found in the form: send each image as a file field", error="missing image")
        req = Request(files, multi=len(fields) > 1, topk=row.get(TOPK_FIELD))  # the form's shape decides: a list
    if not req.images:
        raise RequestError("the request holds no image", error="missing image")
    check_count(len(req.images), max_images)
    return req


def header(headers: dict | None, name: str) -> str | None:
    """Case-insensitive header lookup (TorchServe keeps the client's case)."""
    for key, value in (headers or {}).items():
        # TorchServe puts a form field's or gRPC input's {"content-type": ...} under its name among the
        # request's headers: a field named like a header (content-type, x-top-k) is not that header
        if key.lower() == name and isinstance(value, (str, bytes, bytearray)):
            return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else value
    return None


def parse_topk(headers: dict | None, *, default: int, num_classes: int, body_value=None) -> int:
    """k from the body's ``topk`` field, else the ``X-Top-K`` header, else ``default``; 1..num_classes."""
    value, source = (body_value, "topk") if body_value is not None else (header(headers, TOPK_HEADER), "X-Top-K")
    if value is None:
        return min(default, num_classes)
    if isinstance(value, (bytes, bytearray)):
        value = value.decode(errors="replace")
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        k = int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
    except ValueError:
        raise RequestError(f"{source} must be an integer between 1 and {num_classes}, got {shown(value)}",
                           error="bad top-k") from None
    if not 1 <= k <= num_classes:
        raise RequestError(f"{source} must be between 1 and {num_classes}, got {shown(k)}", error="bad top-k")
    return k
