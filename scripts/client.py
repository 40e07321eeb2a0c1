"""A small HTTP client for the predictions endpoint (standard library only)."""
from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def predict(url: str, model: str, data: bytes, *, content_type: str = "image/png", topk: int | None = None,
            timeout: float = 60) -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if topk is not None:
        headers["X-Top-K"] = str(topk)
    req = urllib.request.Request(f"{url}/predictions/{model}", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
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
