"""The three request/answer protocols one endpoint speaks, per request of a batch.

* ``torchserve`` -- TorchServe's own ``/predictions/NAME``: raw image bytes, a multipart form or JSON
  ``{"data": "<b64>"}`` (see :mod:`inference.requests`); one image gives one object back, several a list.
* ``kserve_v1``  -- KServe's v1 protocol (``POST /v1/models/NAME:predict``): ``{"instances": [...]}``,
  each instance ``{"data": "<b64>"}``, ``{"b64": "<b64>"}``, TensorFlow-Serving's named input
  ``{"image_bytes": {"b64": "<b64>"}}`` (any one name, beside other keys such as its ``"key"``) or a bare
  base64 string; more instances than the limit are a 413 before any is decoded; answered
  ``{"predictions": [<one object per instance>]}``.
* ``oip_v2``     -- the Open Inference Protocol (KServe v2, Triton, ``POST /v2/models/NAME/infer``;
  :mod:`inference.oip`), errors as ``{"error": "..."}``.

TorchServe hands JSON bodies over parsed and never tells the handler which route was called, so the
protocol is told by the body's shape: a JSON object with ``instances`` is v1, one with ``inputs`` v2. A body
sent compressed (``Content-Encoding: gzip``/``deflate``, as tritonclient's ``request_compression_algorithm``
does) is inflated first, within ``max_inflated`` bytes: TorchServe 0.12's frontend passes it on as it came.

Each protocol is one :class:`Protocol` in :data:`REGISTRY` (how it is told, read, answered and refused, and
how its explanations are wrapped); detection asks them in order, TorchServe's own last. A new schema is one
more entry there.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

from inference.oip import BINARY_HEADER, OIP_V2, BinaryAnswer, oip_body, oip_error, read_oip_v2
from inference.requests import (
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_INFLATED_BYTES,
    OVERLAY_FIELD,
    TORCHSERVE,
    Request,
    RequestError,
    check_count,
    decode_b64,
    header,
    inflate,
    parse_json,
    parse_topk,
    read_request,
)
from inference.responses import error_body, failure_reason

KSERVE_V1 = "kserve_v1"
UTF8_BOM = b"\xef\xbb\xbf"

log = logging.getLogger(__name__)


def _body(row: dict | None, headers: dict | None):
    """The request's body; JSON sent without a JSON content type, or compressed (it arrives as bytes), parsed."""
    body = (row or {}).get("body")
    if not isinstance(body, (bytes, bytearray)) or header(headers, BINARY_HEADER) is not None:
        return body
    text = bytes(body[:64]).removeprefix(UTF8_BOM).lstrip()  # curl --data-binary of a pretty-printed file
    if text[:1] in (b"{", b"["):  # an object, or a list of base64 images (TorchServe's JSON list)
        try:
            parsed = parse_json(body)
        except RequestError:  # too many values to parse: its own 413
            raise
        except (ValueError, RecursionError):  # not JSON (nor UTF-8), or nested deeper than Python's parser goes
            return body
        return parsed if isinstance(parsed, (dict, list)) else body
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
    """Which protocol one request of a batch speaks, from its body's shape (and one header): the first of
    :data:`REGISTRY` that claims it (TorchServe's own claims every body)."""
    body = _body(row, headers)
    return next(p.name for p in REGISTRY.values() if p.matches(body, headers))


def read_row(row: dict, headers: dict | None, *, max_images: int, default_topk: int, max_topk: int,
             max_inflated: int = DEFAULT_MAX_INFLATED_BYTES) -> tuple[str, Request | RequestError, int | None]:
    """One request of a batch: ``(protocol, request, topk)``, or ``(protocol, error, None)`` -- the protocol
    its answer (or error) speaks. Whatever the request holds, this only returns: a failure that is not a
    :class:`RequestError` is a bug of ours met on an odd request, answered with that request's 500 alone
    (and logged), never raised into TorchServe, which would answer the whole batch with 503."""
    protocol = TORCHSERVE
    try:
        protocol = detect({"body": b""}, headers)  # from the headers alone, until the body is read
        if isinstance((row or {}).get("body"), (bytes, bytearray)):  # inflated, and JSON parsed, once
            row = {**row, "body": _body({"body": inflate(row["body"], headers, max_bytes=max_inflated)}, headers)}
        protocol = detect(row, headers)
        req = read(row, protocol, headers=headers, max_images=max_images)
        if is_grpc_call(headers):  # TorchServe turns the JSON answer into its gRPC message: JSON only
            req.binary = frozenset()
        if not req.classification:
            return protocol, req, parse_topk(headers, default=default_topk, num_classes=max_topk, body_value=req.topk)
        # a class_count beyond the model's classes is all of them, as Triton answers; one top-k serves every
        # output: the largest count asked, or parameters.topk (judged as any topk) where larger
        req.classification = {name: min(c, max_topk) for name, c in req.classification.items()}
        asked = max(req.classification.values())
        if req.topk is None:
            return protocol, req, asked
        return protocol, req, max(asked, parse_topk(headers, default=default_topk, num_classes=max_topk,
                                                    body_value=req.topk))
    except RequestError as e:
        return protocol, e, None
    except Exception as e:
        log.exception("reading a %s request failed", protocol)
        return protocol, RequestError(f"the request could not be read: {failure_reason(e)}", status=500,
                                      error="internal error"), None


def read(row: dict, protocol: str, *, headers: dict | None = None, max_images: int = DEFAULT_MAX_IMAGES) -> Request:
    """The images and options of one request in ``protocol``; raises :class:`RequestError`."""
    body = _body(row, headers)
    req = lookup(protocol).read(row, body, headers, max_images=max_images)
    if isinstance(body, dict):
        params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        req.overlay = body.get(OVERLAY_FIELD, params.get(OVERLAY_FIELD))
    check_count(len(req.images), max_images)
    return req


def read_torchserve(row: dict, body, headers: dict | None, *, max_images: int = DEFAULT_MAX_IMAGES) -> Request:
    """TorchServe's own forms (:func:`inference.requests.read_request`), with each form field's content type."""
    row = {**row, "body": body} if "body" in row else row
    # per-field content types: HTTP only (a gRPC call's inputs carry none, and every one is an image)
    types = None if is_grpc_call(headers) else {k: v.get("content-type") for k, v in (headers or {}).items()
                                                 if isinstance(v, dict)}
    return read_request(row, max_images=max_images, content_type=header(headers, "content-type"), field_types=types)


def read_kserve_v1(body: dict, *, max_images: int = DEFAULT_MAX_IMAGES) -> Request:
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError('"instances" must be a non-empty list of images: {"data": "<base64>"}, '
                           '{"b64": "<base64>"} or "<base64>"', error="bad request")
    check_count(len(instances), max_images)
    images = []
    for i, item in enumerate(instances):
        if isinstance(item, dict):
            named = [v for v in item.values() if isinstance(v, dict) and "b64" in v]
            if len(named) == 1 and not {"data", "b64"} & item.keys():  # TF-Serving's named input
                item = named[0]  # {"image_bytes": {"b64": ..}}, maybe beside other keys ("key": "1")
            item = item.get("data", item.get("b64"))
            if isinstance(item, dict):  # {"data": {"b64": "..."}}
                item = item.get("b64")
        images.append(decode_b64(item, f"instances[{i}]"))
    parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    return Request(images, multi=True, topk=body.get("topk", parameters.get("topk")), protocol=KSERVE_V1)


def render(req: Request, results: list[dict], *, model_name: str, model_version: str) -> str | BinaryAnswer:
    """The answer body of one request: one per-image result object (as ``/predictions`` gives) each; OIP's
    in binary form where the request asks so (:func:`inference.oip.oip_body`)."""
    return lookup(req.protocol).render(req, results, model_name=model_name, model_version=model_version)


def answer(req: Request, results: list[dict], *, model_name: str, model_version: str) -> str | BinaryAnswer | RequestError:
    """:func:`render`, or this request's 500 when its body cannot be built (a bug of ours met on an odd result,
    logged): as :func:`read_row`, never raised into TorchServe, which would fail the whole batch."""
    try:
        return render(req, results, model_name=model_name, model_version=model_version)
    except Exception as e:
        log.exception("answering a %s request failed", req.protocol)
        return RequestError(f"the answer could not be built: {failure_reason(e)}", status=500,
                            error="internal error")


def answer_headers(body: str | bytes, *, grpc: bool = False) -> dict[str, str]:
    """The response headers of an answer (or error) body: JSON's content type, or for a binary OIP answer
    ``application/octet-stream`` and the JSON header's length, as Triton sends them; a gRPC call's answer
    says ``ts_stream_next=false`` (see :func:`is_grpc_call`)."""
    if isinstance(body, BinaryAnswer):
        return {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(body.header_length)}
    return {"content-type": "application/json", **({"ts_stream_next": "false"} if grpc else {})}


def bounded(body: str | bytes, *, limit: int) -> RequestError | None:
    """The error that replaces an answer of more than ``limit`` bytes (``max_response_bytes``), or None.
    TorchServe's frontend refuses a worker's answer over its ``max_response_size`` by dropping the worker:
    every request of the batch fails and the model restarts. JSON answers are ASCII (``json.dumps``), so
    characters are bytes."""
    if len(body) <= limit:
        return None
    return RequestError(f"the answer would be {len(body)} bytes, over this model's max_response_bytes ({limit}): "
                        "ask for fewer classes (topk) or send fewer images per request", status=413,
                        error="answer too large")


def status_of(err: Exception) -> tuple[int, str]:
    """The HTTP status and the error kind of a per-request error (a :class:`RequestError` or an
    ``inference.images.ImageError``: both carry them)."""
    return getattr(err, "status", 400), getattr(err, "error", None) or "bad image"


def render_error(protocol: str, kind: str, detail: str, *, status: int, model_name: str = "",
                 model_version: str = "", grpc: bool = False) -> str:
    """A per-request error: OIP's ``{"error": "..."}`` (:func:`inference.oip.oip_error`; over gRPC with what
    TorchServe's gRPC answer needs), else ``{"error", "detail", "code"}``."""
    return lookup(protocol).render_error(kind, detail, status=status, model_name=model_name,
                                           model_version=model_version, grpc=grpc)


@dataclass(frozen=True)
class Protocol:
    """One request/answer schema: whether a (parsed) body speaks it, how its images and options are read, how
    per-image results, a per-request error and per-image explanations (``None``: it has none) are answered."""
    name: str
    title: str
    matches: Callable[[object, dict | None], bool]    # (body, headers)
    read: Callable[..., Request]                      # (row, body, headers, *, max_images)
    render: Callable[..., str | BinaryAnswer]         # (req, results, *, model_name, model_version)
    render_error: Callable[..., str]                  # (kind, detail, *, status, model_name, model_version, grpc)
    explanations: Callable[[Request, list[dict]], object] | None  # (req, per-image objects) -> JSON value


# -- the registry: each protocol's pieces, named, then the table ----------------------------------------------
def _is_kserve_v1(body, headers) -> bool:
    return isinstance(body, dict) and "instances" in body


def _is_oip_v2(body, headers) -> bool:
    return (isinstance(body, dict) and "inputs" in body) or (
        isinstance(body, (bytes, bytearray)) and header(headers, BINARY_HEADER) is not None)


def _read_kserve_v1(row, body, headers, *, max_images: int) -> Request:
    return read_kserve_v1(body, max_images=max_images)


def _read_oip_v2(row, body, headers, *, max_images: int) -> Request:
    return read_oip_v2(body, headers, max_images=max_images)


def _one_or_list(req: Request, items: list[dict]):
    return items if req.multi else items[0]


def _render_torchserve(req: Request, results: list[dict], **_) -> str:
    return json.dumps(_one_or_list(req, results))


def _render_kserve_v1(req: Request, results: list[dict], **_) -> str:
    return json.dumps({"predictions": results})


def _plain_error(kind: str, detail: str, *, status: int, **_) -> str:
    return error_body(kind, detail, status=status)


def _oip_error(kind: str, detail: str, *, status: int, model_name: str = "", model_version: str = "",
               grpc: bool = False) -> str:
    return oip_error(f"{kind}: {detail}", model_name=model_name, model_version=model_version, grpc=grpc)


REGISTRY: dict[str, Protocol] = {p.name: p for p in (  # in the order detection asks them
    Protocol(KSERVE_V1, "KServe v1", _is_kserve_v1, _read_kserve_v1, _render_kserve_v1, _plain_error,
             explanations=lambda req, items: {"explanations": items}),
    Protocol(OIP_V2, "the Open Inference Protocol", _is_oip_v2, _read_oip_v2, oip_body, _oip_error,
             explanations=None),
    Protocol(TORCHSERVE, "TorchServe's predictions API", lambda body, headers: True, read_torchserve,
             _render_torchserve, _plain_error, explanations=_one_or_list),
)}


def lookup(name: str) -> Protocol:
    """The registered protocol called ``name``; ValueError naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown protocol {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]
