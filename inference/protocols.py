"""The three request/answer protocols one endpoint speaks, per request of a batch.

* ``torchserve`` -- TorchServe's own ``/predictions/NAME``: raw image bytes, a multipart form or JSON
  ``{"data": "<b64>"}`` (see :mod:`inference.requests`); one image gives one object back, several a list.
* ``kserve_v1``  -- KServe's v1 protocol (``POST /v1/models/NAME:predict``): ``{"instances": [...]}``,
  each instance ``{"data": "<b64>"}``, ``{"b64": "<b64>"}`` (TensorFlow-Serving style) or a bare
  base64 string; answered ``{"predictions": [<one object per instance>]}``.
* ``oip_v2``     -- the Open Inference Protocol (KServe v2, Triton, ``POST /v2/models/NAME/infer``):
  ``{"id": ..., "inputs": [{"name": ..., "shape": [N], "datatype": "BYTES", "data": ["<b64>", ...]}],
  "parameters": {"topk": k}, "outputs": [{"name": "labels"}, ...]}``; answered with the tensors
  ``labels`` (BYTES ``[N, k]``), ``scores`` (FP32 ``[N, k]``) and ``indices`` (INT64 ``[N, k]``), and
  errors as ``{"error": "..."}``. Triton's binary tensor extension (``Inference-Header-Content-Length``)
  is read too: its BYTES elements may be the raw image bytes.

TorchServe hands JSON bodies over parsed and never tells the handler which route was called, so the
protocol is told by the body's shape: a JSON object with ``instances`` is v1, one with ``inputs`` v2.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct

from inference.requests import Request, RequestError, decode_b64, header, parse_topk, read_request
from inference.responses import error_body

TORCHSERVE, KSERVE_V1, OIP_V2 = "torchserve", "kserve_v1", "oip_v2"
PROTOCOLS = (TORCHSERVE, KSERVE_V1, OIP_V2)
OIP_INPUT = "image"                                  # the documented input name (any one name is accepted)
OIP_OUTPUTS = {"labels": "BYTES", "scores": "FP32", "indices": "INT64"}
BINARY_HEADER = "inference-header-content-length"   # Triton's binary tensor extension

log = logging.getLogger(__name__)


def _body(row: dict | None, headers: dict | None):
    """The request's body; a JSON object sent without a JSON content type (it arrives as bytes) parsed."""
    body = (row or {}).get("body")
    if isinstance(body, (bytes, bytearray)) and body[:1] == b"{" and header(headers, BINARY_HEADER) is None:
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's parser goes
            return body
        return parsed if isinstance(parsed, dict) else body
    return body


def is_grpc_call(headers: dict | None) -> bool:
    """Whether TorchServe 0.12 handed this request in from gRPC: an HTTP request always brings its
    request-level headers (strings: Host, Content-Length, ...); a gRPC call brings only the per-input
    ``{"content-type": ...}`` dicts under its input names (``Predictions``: ``data``; ``ModelInfer``:
    ``body``). The handler answers gRPC calls with ``ts_stream_next=false``: TorchServe 0.12 ends a
    ``StreamPredictions`` call only on an answer that says so (without it its GRPCJob throws a
    NullPointerException and restarts the worker); never on HTTP, where the header turns the answer
    into a chunked stream."""
    return not any(isinstance(v, str) for v in (headers or {}).values())


def detect(row: dict | None, headers: dict | None) -> str:
    """Which protocol one request of a batch speaks, from its body's shape (and one header)."""
    body = _body(row, headers)
    if isinstance(body, dict):
        if "instances" in body:
            return KSERVE_V1
        if "inputs" in body:
            return OIP_V2
    if isinstance(body, (bytes, bytearray)) and header(headers, BINARY_HEADER) is not None:
        return OIP_V2
    return TORCHSERVE


def read_row(row: dict, headers: dict | None, *, max_images: int, default_topk: int, max_topk: int
             ) -> tuple[str, Request | RequestError, int | None]:
    """One request of a batch: ``(protocol, request, topk)``, or ``(protocol, error, None)`` -- the protocol
    its answer (or error) speaks. Whatever the request holds, this only returns: a failure that is not a
    :class:`RequestError` is a bug of ours met on an odd request, answered with that request's 500 alone
    (and logged), never raised into TorchServe, which would answer the whole batch with 503."""
    protocol = TORCHSERVE
    try:
        protocol = detect(row, headers)
        req = read(row, protocol, headers=headers, max_images=max_images)
        return protocol, req, parse_topk(headers, default=default_topk, num_classes=max_topk, body_value=req.topk)
    except RequestError as e:
        return protocol, e, None
    except Exception as e:
        log.exception("reading a %s request failed", protocol)
        return protocol, RequestError(f"the request could not be read: {type(e).__name__}: {e}", status=500,
                                      error="internal error"), None


def read(row: dict, protocol: str, *, headers: dict | None = None, max_images: int = 32) -> Request:
    """The images and options of one request in ``protocol``; raises :class:`RequestError`."""
    body = _body(row, headers)
    if protocol == KSERVE_V1:
        req = read_kserve_v1(body)
    elif protocol == OIP_V2:
        req = read_oip_v2(body, headers)
    else:
        row = {**row, "body": body} if "body" in row else row
        # per-field content types: HTTP only (a gRPC call's inputs carry none, and every one is an image)
        types = None if is_grpc_call(headers) else {k: v.get("content-type") for k, v in (headers or {}).items()
                                                     if isinstance(v, dict)}
        return read_request(row, max_images=max_images, content_type=header(headers, "content-type"),
                            field_types=types)
    if len(req.images) > max_images:
        raise RequestError(f"{len(req.images)} images in one request; the limit is {max_images}", status=413,
                           error="too many images")
    return req


def read_kserve_v1(body: dict) -> Request:
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError('"instances" must be a non-empty list of images: {"data": "<base64>"}, '
                           '{"b64": "<base64>"} or "<base64>"', error="bad request")
    images = []
    for i, item in enumerate(instances):
        if isinstance(item, dict):
            item = item.get("data", item.get("b64"))
            if isinstance(item, dict):  # {"data": {"b64": "..."}}
                item = item.get("b64")
        images.append(decode_b64(item, f"instances[{i}]"))
    parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    return Request(images, multi=True, topk=body.get("topk", parameters.get("topk")), protocol=KSERVE_V1)


def _flatten(data: list) -> list:
    """The leaves of nested lists in order (row-major, as OIP's ``data`` may nest by ``shape``); a loop
    with a stack, not recursion, so no nesting depth can raise ``RecursionError``."""
    out, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _binary_body(raw: bytes | bytearray, length: str) -> tuple[dict, bytes]:
    try:
        n = int(length)
        head = json.loads(bytes(raw[:n]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError(f"the {BINARY_HEADER} header ({length!r}) does not frame a JSON inference header",
                           error="bad request") from None
    if not isinstance(head, dict):
        raise RequestError("the binary request's inference header is not a JSON object", error="bad request")
    return head, bytes(raw[n:])


def _bytes_elements(blob: bytes, where: str) -> list[bytes]:
    """Triton's BYTES tensor encoding: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise RequestError(f"{where}: truncated BYTES element", error="bad request")
        (n,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise RequestError(f"{where}: a BYTES element of {n} bytes runs past the data", error="bad request")
        out.append(blob[pos:pos + n])
        pos += n
    return out


def _image_bytes(element: bytes) -> bytes:
    """A binary BYTES element: the image itself, or its base64 text (image bytes are never strict base64)."""
    try:
        decoded = base64.b64decode(element, validate=True)
        return decoded if decoded else element
    except (binascii.Error, ValueError):
        return element


def read_oip_v2(body, headers: dict | None = None) -> Request:
    binary = b""
    if isinstance(body, (bytes, bytearray)):
        body, binary = _binary_body(body, header(headers, BINARY_HEADER))
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(f'"inputs" must hold exactly one tensor: {{"name": "{OIP_INPUT}", "shape": [N], '
                           '"datatype": "BYTES", "data": ["<base64>", ...]}', error="bad request")
    tensor = inputs[0]
    name = tensor.get("name", OIP_INPUT)
    if tensor.get("datatype") != "BYTES":
        raise RequestError(f'input "{name}": datatype must be BYTES (encoded images), got {tensor.get("datatype")!r}',
                           error="bad request")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(f'input "{name}": shape must be a list of non-negative integers, e.g. [N]',
                           error="bad request")
    size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor.get("parameters"), dict) \
        else None
    if size is not None:
        if type(size) is not int or size < 0:
            raise RequestError(f'input "{name}": parameters.binary_data_size must be a non-negative integer, got '
                               f'{size!r}', error="bad request")
        elements = [_image_bytes(e) for e in _bytes_elements(binary[:size], f'input "{name}"')]
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise RequestError(f'input "{name}": "data" must be a list of base64 strings', error="bad request")
        # TorchServe's OIP gRPC service base64-encodes bytes_contents into this JSON: a client that sent
        # base64 text there arrives encoded twice, one that sent the image bytes once (_image_bytes).
        elements = [_image_bytes(decode_b64(d, f'input "{name}" element {i}'))
                    for i, d in enumerate(_flatten(data))]
    if math.prod(shape) != len(elements) or not elements:
        raise RequestError(f'input "{name}": shape {shape} holds {math.prod(shape)} elements but {len(elements)} '
                           "images were sent", error="bad request")
    outputs = body.get("outputs")
    wanted = None
    if outputs is not None:
        names = [o.get("name") if isinstance(o, dict) else None for o in outputs] if isinstance(outputs, list) else [None]
        unknown = [n for n in names if not isinstance(n, str) or n not in OIP_OUTPUTS]
        if unknown or not names:
            raise RequestError(f'"outputs" may name {", ".join(OIP_OUTPUTS)}; got {unknown or names}',
                               error="bad request")
        wanted = tuple(names)
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError('"id" must be a string', error="bad request")
    parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    return Request(elements, multi=True, topk=parameters.get("topk"), protocol=OIP_V2, id=request_id,
                   outputs=wanted)


def render(req: Request, results: list[dict], *, model_name: str, model_version: str) -> str:
    """The answer body of one request: one per-image result object (as ``/predictions`` gives) each."""
    if req.protocol == KSERVE_V1:
        return json.dumps({"predictions": results})
    if req.protocol == OIP_V2:
        return json.dumps(oip_answer(req, results, model_name=model_name, model_version=model_version))
    return json.dumps(results if req.multi else results[0])


def oip_answer(req: Request, results: list[dict], *, model_name: str, model_version: str) -> dict:
    n, k = len(results), len(results[0]["predictions"])
    rows = [r["predictions"] for r in results]
    data = {"labels": [p["class"] for row in rows for p in row],
            "scores": [p["confidence"] for row in rows for p in row],
            "indices": [p["index"] for row in rows for p in row]}
    body = {"id": "", "model_name": model_name, "model_version": model_version,
            "outputs": [{"name": name, "datatype": OIP_OUTPUTS[name], "shape": [n, k], "data": data[name]}
                        for name in (req.outputs or OIP_OUTPUTS)],
            "parameters": {"tta": results[0]["tta"]}}
    if "tta_applied" in results[0]:
        body["parameters"]["tta_applied"] = [r["tta_applied"] for r in results]
    body["id"] = req.id if req.id is not None else ""  # TorchServe's OIP gRPC path needs the key
    return body


def render_error(protocol: str, kind: str, detail: str, *, status: int, model_name: str = "",
                 model_version: str = "") -> str:
    """A per-request error: OIP's ``{"error": "..."}``, else ``{"error", "detail", "code"}``.

    TorchServe 0.12's OIP gRPC service turns every answer into a ``ModelInferResponse`` whatever its
    status, and its worker thread dies on a body without ``id``/``model_name``/``outputs``: so the OIP
    error also carries those, with the message as a BYTES output named ``error``.
    """
    if protocol == OIP_V2:
        message = f"{kind}: {detail}"
        return json.dumps({"error": message, "id": "", "model_name": model_name, "model_version": model_version,
                           "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [message]}]})
    return error_body(kind, detail, status=status)
