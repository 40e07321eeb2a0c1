"""The Open Inference Protocol (KServe v2, Triton; ``POST /v2/models/NAME/infer``): its requests and answers.

* Request: ``{"id": ..., "inputs": [{"name": ..., "shape": [N], "datatype": "BYTES", "data": ["<b64>", ...]}],
  "parameters": {"topk": k}, "outputs": [{"name": "labels"}, ...]}``. Triton's binary tensor extension
  (``Inference-Header-Content-Length``, 0 for a body of JSON only; ``binary_data_size`` must be the bytes that
  follow) is read too: its BYTES elements may be the raw image bytes or their base64 text. More images than the
  request's limit (by the shape, or the elements sent) are a 413 before any of them is decoded.
* Answer: the tensors ``labels`` (BYTES ``[N, k]``), ``scores`` (FP32 ``[N, k]``) and ``indices`` (INT64
  ``[N, k]``); with adaptive TTA also ``tta_applied`` (BOOL ``[N]``, which any request may name). Response
  ``parameters`` hold scalars only, as the protocol asks: ``tta`` and, with adaptive TTA, ``tta_applied_count``.
* The classification extension: an output asked for with ``"parameters": {"classification": c}`` is
  answered as Triton does, a BYTES ``[N, c]`` tensor of ``"<score>:<index>:<label>"`` strings (the score
  with six decimals), best first; the request's k is then the largest ``c`` asked (with ``parameters.topk`` if
  larger); a ``c`` beyond the model's classes gives all of them, as Triton does.
* Binary outputs, as Triton answers them: an output asked with ``"parameters": {"binary_data": true}``
  (tritonclient's default), or every output when the request's ``parameters.binary_data_output`` is true and
  the output does not say ``false``, leaves ``data`` out of its JSON and says ``binary_data_size``; its raw
  bytes (little-endian numbers, BOOL one byte each, BYTES each a 4-byte length and the UTF-8 text) follow the
  JSON in output order, and the ``Inference-Header-Content-Length`` response header gives the JSON's length
  (:class:`BinaryAnswer`). Errors are JSON always; over gRPC every answer is JSON (TorchServe converts it).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import struct

from inference.requests import DEFAULT_MAX_IMAGES, Request, RequestError, check_count, decode_b64, header, shown
from inference.requests import parse_json as parse_bounded_json

OIP_V2 = "oip_v2"
OIP_INPUT = "image"                                  # the documented input name (any one name is accepted)
OIP_OUTPUTS = {"labels": "BYTES", "scores": "FP32", "indices": "INT64"}   # the default answer
OPTIONAL_OUTPUTS = {"tta_applied": "BOOL"}           # on request (and by default with adaptive TTA)
BINARY_HEADER = "inference-header-content-length"   # Triton's binary tensor extension
RAW_FORMATS = {"FP32": "f", "INT64": "q", "BOOL": "?"}  # struct codes of the numeric outputs' binary form
WRAPPED_B64 = re.compile(rb"[A-Za-z0-9+/]{4,76}\r?\n")  # base64 text in lines (`base64`, encodebytes())
MAX_ID_CHARS = 1024     # the request "id", echoed in the answer (KServe's clients send a 36-character UUID)


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
    """The JSON header and the bytes after it; a length of 0 is a body of JSON only, as Triton reads it."""
    try:
        n = int(length)
        if not 0 <= n <= len(raw):
            raise ValueError
        head = parse_bounded_json(raw[:n or len(raw)])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # a RequestError: too many objects, its own 413
        raise e if isinstance(e, RequestError) else RequestError(
            f"the {BINARY_HEADER} header ({shown(length)}) does not frame a JSON inference header in the {len(raw)} "
            "bytes sent", error="bad request") from None
    if not isinstance(head, dict):
        raise RequestError("the binary request's inference header is not a JSON object", error="bad request")
    return head, bytes(raw[n:]) if n else b""


def _bytes_elements(blob: bytes, where: str, *, max_images: int) -> list[bytes]:
    """Triton's BYTES tensor encoding: each element is a 4-byte little-endian length, then the bytes; read no
    further than one element past ``max_images`` (then 413)."""
    out, pos = [], 0
    while pos < len(blob):
        check_count(len(out), max_images)
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
    """A binary BYTES element: the image itself, or its base64 text, maybe in lines (image bytes are never strict
    base64, nor lines of it: only text that starts as such is stripped of its line breaks, as JSON's is)."""
    try:
        decoded = base64.b64decode(b"".join(element.split()) if WRAPPED_B64.match(element) else element, validate=True)
    except (binascii.Error, ValueError):
        return element
    return decoded or element


def _parameters(holder: dict, where: str) -> dict:
    """The ``parameters`` object of a request, input or output (``{}`` when absent); anything else is a 400."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RequestError(f'{where}"parameters" must be a JSON object, got {shown(params)}', error="bad request")
    return params


def _elements(tensor: dict, name: str, binary: bytes, *, max_images: int) -> list[bytes]:
    """The image bytes of the input tensor: from the binary data that follows the header, or its JSON ``data``;
    more than ``max_images`` is a 413 before any is decoded."""
    size = _parameters(tensor, f'input "{name}": ').get("binary_data_size")
    if size is None:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise RequestError(f'input "{name}": "data" must be a list of base64 strings', error="bad request")
        if binary:  # as Triton: "unexpected additional input data"
            raise RequestError(f'{len(binary)} bytes follow the inference header but input "{name}" has no '
                               "parameters.binary_data_size", error="bad request")
        data = _flatten(data)
        check_count(len(data), max_images)
        # TorchServe's OIP gRPC service base64-encodes bytes_contents into this JSON: a client that sent
        # base64 text there arrives encoded twice, one that sent the image bytes once (_image_bytes).
        return [_image_bytes(decode_b64(d, f'input "{name}" element {i}')) for i, d in enumerate(data)]
    if type(size) is not int or size < 0:
        raise RequestError(f'input "{name}": parameters.binary_data_size must be a non-negative integer, got '
                           f'{shown(size)}', error="bad request")
    if size != len(binary):  # Triton refuses both: a cut-off upload, or bytes that belong to no tensor
        raise RequestError(f'input "{name}": parameters.binary_data_size is {size} but {len(binary)} bytes follow '
                           "the inference header", error="bad request")
    return [_image_bytes(e) for e in _bytes_elements(binary, f'input "{name}"', max_images=max_images)]


def _flag(params: dict, key: str, where: str) -> bool | None:
    """A boolean parameter (``binary_data``, ``binary_data_output``), or None where it is not given."""
    value = params.get(key)
    if value is not None and type(value) is not bool:
        raise RequestError(f"{where}parameters.{key} must be true or false, got {shown(value)}", error="bad request")
    return value


def _outputs(outputs, *, binary_default: bool) -> tuple[tuple[str, ...] | None, dict[str, int], frozenset[str]]:
    """The output names asked for (``None``: the default answer), the classification count of each that asks
    for one, and the outputs to answer in binary form (with the default answer: all or none)."""
    allowed = {**OIP_OUTPUTS, **OPTIONAL_OUTPUTS}
    if outputs is None or outputs == []:
        return None, {}, frozenset(allowed if binary_default else ())
    items = outputs if isinstance(outputs, list) else [None]
    names = [o.get("name") if isinstance(o, dict) else None for o in items]
    unknown = [n for n in names if not isinstance(n, str) or n not in allowed]
    if unknown:
        raise RequestError(f'"outputs" may name {", ".join(allowed)}; got {shown(unknown)}', error="bad request")
    if len(set(names)) < len(names):  # as Triton: "output '...' already exists in request"
        raise RequestError(f'"outputs" names an output more than once: {shown(names)}', error="bad request")
    classification, binary = {}, set()
    for name, o in zip(names, items):
        params = _parameters(o, f'output "{name}": ')
        if (flag := _flag(params, "binary_data", f'output "{name}": ')) or (flag is None and binary_default):
            binary.add(name)
        c = params.get("classification")
        if c is None:
            continue
        if type(c) is not int or c < 1 or name in OPTIONAL_OUTPUTS:
            raise RequestError(f'output "{name}": parameters.classification must be an integer >= 1 on labels, '
                               f"scores or indices, got {shown(c)}", error="bad top-k")
        classification[name] = c
    return tuple(names), classification, frozenset(binary)


def read_oip_v2(body, headers: dict | None = None, *, max_images: int = DEFAULT_MAX_IMAGES) -> Request:
    binary = b""
    if isinstance(body, (bytes, bytearray)):
        body, binary = _binary_body(body, header(headers, BINARY_HEADER))
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(f'"inputs" must hold exactly one tensor: {{"name": "{OIP_INPUT}", "shape": [N], '
                           '"datatype": "BYTES", "data": ["<base64>", ...]}', error="bad request")
    tensor = inputs[0]
    name = tensor.get("name", OIP_INPUT)
    if not isinstance(name, str):
        raise RequestError(f'the input\'s "name" must be a string, got {shown(name)}', error="bad request")
    name = shown(name)[1:-1]  # quoted in messages: a few dozen characters
    if tensor.get("datatype") != "BYTES":
        raise RequestError(f'input "{name}": datatype must be BYTES (encoded images), got '
                           f'{shown(tensor.get("datatype"))}', error="bad request")
    shape = tensor.get("shape")  # [N] or [N, 1]: the answer's [N, k] outputs keep the batch as N
    if (not isinstance(shape, list) or len(shape) not in (1, 2) or shape[1:] not in ([], [1])
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise RequestError(f'input "{name}": shape must be [N] or [N, 1] for N images, got {shown(shape)}',
                           error="bad request")
    held = _product(shape, stop=2**63)
    if held == 0:
        raise RequestError(f'input "{name}": shape {shown(shape)} holds no image: send at least one', error="bad request")
    if held > max_images:  # before any element is read
        raise RequestError(f'input "{name}": shape {shown(shape)} holds {held if held <= 2**63 else "over 2**63"} '
                           f"images; the limit is {max_images}", status=413, error="too many images")
    elements = _elements(tensor, name, binary, max_images=max_images)
    if held != len(elements):
        raise RequestError(f'input "{name}": shape {shown(shape)} holds {held if held <= 2**63 else "over 2**63"} '
                           f"elements but {len(elements)} images were sent", error="bad request")
    request_id = body.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS
                                   or not request_id.isascii() and not _unicode(request_id)):
        raise RequestError(f'"id" must be a string of at most {MAX_ID_CHARS} characters of valid Unicode '
                           "(it is echoed)", error="bad request")
    parameters = _parameters(body, "")
    wanted, classification, binary = _outputs(body.get("outputs"),
                                              binary_default=bool(_flag(parameters, "binary_data_output", "")))
    return Request(elements, multi=True, topk=parameters.get("topk"), protocol=OIP_V2, id=request_id, outputs=wanted,
                   classification=classification or None, binary=binary)


def _unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode: JSON lets a lone surrogate through (``"\\ud800"``), which strict
    parsers (tritonclient's rapidjson) refuse when it is echoed back."""
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _product(shape: list[int], *, stop: int) -> int:
    """The elements ``shape`` holds, or ``stop + 1`` as soon as the product passes ``stop`` (a shape of huge
    dimensions is never multiplied out, nor its product formatted)."""
    product = 1
    for d in shape:
        product *= d
        if product > stop:
            return stop + 1
    return product


def _tensor(name: str, rows: list[list[dict]], applied: list[bool], classification: dict[str, int]) -> dict:
    n, k = len(rows), len(rows[0])
    if name in classification:  # Triton's classification extension: "<score>:<index>:<label>", best first
        c = min(classification[name], k)
        data = [f"{p['confidence']:.6f}:{p['index']}:{p['class']}" for row in rows for p in row[:c]]  # C++'s
        # std::to_string(float), as Triton writes the score: six decimals
        return {"name": name, "datatype": "BYTES", "shape": [n, c], "data": data}
    if name == "tta_applied":
        return {"name": name, "datatype": "BOOL", "shape": [n], "data": applied}
    key = {"labels": "class", "scores": "confidence", "indices": "index"}[name]
    return {"name": name, "datatype": OIP_OUTPUTS[name], "shape": [n, k], "data": [p[key] for row in rows for p in row]}


def _raw(datatype: str, data: list) -> bytes:
    """A tensor's data in Triton's binary form: BYTES elements each a 4-byte little-endian length and the
    UTF-8 bytes; numbers packed little-endian, BOOL one byte each."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (str(x).encode() for x in data))
    return struct.pack(f"<{len(data)}{RAW_FORMATS[datatype]}", *data)


class BinaryAnswer(bytes):
    """An answer in Triton's binary tensor extension: the JSON inference header, then the binary outputs'
    bytes; ``header_length`` (the JSON's bytes) goes out as the ``Inference-Header-Content-Length`` header."""
    header_length: int

    @classmethod
    def of(cls, header: dict, blobs: list[bytes]) -> BinaryAnswer:
        head = json.dumps(header).encode()
        answer = cls(head + b"".join(blobs))
        answer.header_length = len(head)
        return answer


def oip_answer(req: Request, results: list[dict], *, model_name: str, model_version: str) -> dict:
    """The answer as JSON tensors, every output with its ``data`` (:func:`oip_body` applies binary outputs)."""
    adaptive = "tta_applied" in results[0]
    applied = [bool(r.get("tta_applied", r["tta"] != "none")) for r in results]
    names = req.outputs or (*OIP_OUTPUTS, *(["tta_applied"] if adaptive else []))
    rows = [r["predictions"] for r in results]
    tta = next((r["tta"] for r in results if r["tta"] != "none"), results[0]["tta"])  # the TTA that ran, if any
    parameters = {"tta": tta, **({"tta_applied_count": sum(applied)} if adaptive else {})}
    return {"id": req.id if req.id is not None else "",  # TorchServe's OIP gRPC path needs the key
            "model_name": model_name, "model_version": model_version,
            "outputs": [_tensor(name, rows, applied, req.classification or {}) for name in names],
            "parameters": parameters}


def oip_body(req: Request, results: list[dict], *, model_name: str, model_version: str) -> str | BinaryAnswer:
    """The answer's body: JSON, or a :class:`BinaryAnswer` where any output is asked in binary form."""
    answer = oip_answer(req, results, model_name=model_name, model_version=model_version)
    if not req.binary:
        return json.dumps(answer)
    blobs = []
    for tensor in answer["outputs"]:
        if tensor["name"] in req.binary:
            blobs.append(_raw(tensor["datatype"], tensor.pop("data")))
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
    return BinaryAnswer.of(answer, blobs)


def oip_error(message: str, *, model_name: str, model_version: str, grpc: bool = False) -> str:
    """``{"error": "<message>"}``; over gRPC, where TorchServe 0.12 makes every answer a ``ModelInferResponse`` (its
    worker thread dies on one without ``id``/``model_name``/``outputs``), with those, the message as output ``error``."""
    if not grpc:
        return json.dumps({"error": message})
    return json.dumps({"error": message, "id": "", "model_name": model_name, "model_version": model_version,
                       "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [message]}]})
