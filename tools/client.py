"""HTTP calls to a TorchServe's inference and management APIs (standard library only).

``predict`` posts one image to ``/predictions/MODEL``; ``predict_files`` posts many at once (so the
server batches them); ``call`` is any request, answered as ``(status, text)`` whatever the status;
``manage`` is a management-API call whose body is parsed as JSON where it is JSON. A loopback URL never goes
through ``http_proxy``/``HTTP_PROXY`` (urllib would send 127.0.0.1 to a proxy set without ``no_proxy``: start-up
then timed out and ``make stop`` found /metrics unreachable); any other host goes as urllib sends it.
"""
from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(req: urllib.request.Request | str, *, timeout: float):
    """``urllib.request.urlopen``, straight to a loopback host whatever the proxy variables say."""
    url = req.full_url if isinstance(req, urllib.request.Request) else req
    host = urllib.parse.urlsplit(url).hostname
    return (_DIRECT.open if host in LOOPBACK else urllib.request.urlopen)(req, timeout=timeout)


def call(url: str, *, method: str = "GET", data: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, str]:
    """``(status, body text)``: an HTTP error status is an answer here, not an exception."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def manage(management_url: str, method: str, path: str, *, timeout: float = 120) -> tuple[int, dict | list | str]:
    """A management-API call (``path`` such as ``/models?url=x.mar``): the body as JSON, else as text."""
    status, body = call(f"{management_url}{path}", method=method, timeout=timeout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def predict(url: str, model: str, data: bytes, *, content_type: str = "image/png", topk: int | None = None,
            timeout: float = 60) -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if topk is not None:
        headers["X-Top-K"] = str(topk)
    req = urllib.request.Request(f"{url}/predictions/{model}", data=data, headers=headers, method="POST")
    try:
        with urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": body.decode(errors="replace")}


def predict_files(url: str, model: str, paths: list[str], *, concurrency: int = 8) -> list[tuple[int, dict]]:
    """POST every file (concurrently, so the server batches them); results in input order."""
    def one(path: str) -> tuple[int, dict]:
        with open(path, "rb") as f:
            return predict(url, model, f.read(), content_type=mimetypes.guess_type(path)[0] or "image/png")
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, paths))
