"""Drain a TorchServe: wait until the inference requests it has received are answered.

TorchServe 0.12 does not drain by itself: SIGTERM (which is also all ``torchserve --stop`` does)
closes every client connection at once, so requests in flight get a connection reset and no HTTP
answer (measured; upstream issue pytorch/serve#2008). Unregistering the model is no drain either:
``DELETE /models/NAME`` with a batch in flight answered 500 ConcurrentModificationException and left
those requests hanging without an answer. So a stop (``TorchServe.stop(drain_timeout=...)``, and
``python -m scripts.ts_server stop``) first waits until the requests that had arrived are answered,
counted from the frontend's own records: arrivals per model from ``ts_inference_requests_total`` on
``/metrics`` (needs ``metrics_mode=prometheus``), answers per model from the lines of
``access_log.log`` written since the server started. Then it sends SIGTERM. TorchServe cannot refuse
new connections meanwhile: requests that arrive during the drain may still be cut, so take the
instance out of rotation first.
"""
from __future__ import annotations

import os
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

ARRIVALS_RE = re.compile(r'^ts_inference_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$', re.M)
ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')


def inference_arrivals(metrics_url: str, timeout: float = 5) -> dict[str, int] | None:
    """Inference requests received per model name since start (``ts_inference_requests_total``, all
    versions), or None when ``/metrics`` is empty (TorchServe's ``metrics_mode`` is not prometheus)."""
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    if not text.strip():
        return None
    counts: dict[str, int] = {}
    for m in ARRIVALS_RE.finditer(text):
        name = re.search(r'model_name="([^"]*)"', m["labels"])
        if name:
            counts[name[1]] = counts.get(name[1], 0) + int(float(m["value"]))
    return counts


def model_of_uri(uri: str) -> str | None:
    """The model an inference URI is for (what ``ts_inference_requests_total`` counts it under)."""
    path, _, query = uri.partition("?")
    parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "predictions":
        return parts[1]
    if parts == ["invocations"]:
        return (urllib.parse.parse_qs(query).get("model_name") or [None])[0]
    if len(parts) == 3 and parts[0] == "models" and parts[2] == "invoke":
        return parts[1]
    if len(parts) in (2, 3) and parts[-1] == "predict":
        return parts[0]
    if len(parts) == 3 and parts[0] == "v1" and parts[1] == "models" and parts[2].endswith(":predict"):
        return parts[2].removesuffix(":predict")  # KServe v1
    if len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] == "infer":
        return parts[2]  # Open Inference Protocol, with or without /versions/V
    return None


class AccessLogAnswers:
    """Inference answers per model, read incrementally from ``access_log.log`` from ``offset`` on
    (TorchServe writes one line per response, just before it writes the response itself)."""

    def __init__(self, path: str | os.PathLike, offset: int = 0):
        self.path, self.pos, self.counts, self._partial = Path(path), int(offset), {}, b""

    def read(self) -> dict[str, int]:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.pos:  # rolled over (daily or at 100 MB): start again
                    self.pos, self._partial = 0, b""
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return dict(self.counts)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            m = ACCESS_RE.search(line.decode(errors="replace"))
            if m and m["method"] != "OPTIONS":
                name = model_of_uri(m["uri"])
                if name is not None:
                    self.counts[name] = self.counts.get(name, 0) + 1
        return dict(self.counts)


def drain(metrics_url: str, access_log: str | os.PathLike, *, offset: int = 0, timeout: float = 30,
          poll: float = 0.05) -> dict:
    """Wait until every inference request that had arrived when this was called is answered.

    Done when, for every model, the answers logged since start reach the arrivals counted at the
    call, or when nothing at all is in flight; gives up after ``timeout`` seconds. Exact when one
    worker serves each model (TorchServe's job queue is first in, first out); with several workers a
    later batch can finish first, and under continuous traffic the drain may then end a batch early.
    Returns ``{"drained", "in_flight", "seconds", "reason"}``.
    """
    start = time.time()
    try:
        target = inference_arrivals(metrics_url)
    except OSError as e:
        return {"drained": False, "in_flight": None, "seconds": 0.0, "reason": f"/metrics unreachable: {e}"}
    if target is None:
        return {"drained": False, "in_flight": None, "seconds": 0.0,
                "reason": "/metrics is empty: the drain needs metrics_mode=prometheus"}
    answers = AccessLogAnswers(access_log, offset)
    done = answers.read()
    in_flight = sum(max(0, n - done.get(m, 0)) for m, n in target.items())
    left = in_flight
    while True:
        if left == 0:
            return {"drained": True, "in_flight": in_flight, "seconds": round(time.time() - start, 3), "reason": ""}
        if time.time() - start > timeout:
            return {"drained": False, "in_flight": in_flight, "seconds": round(time.time() - start, 3),
                    "reason": f"{left} of {in_flight} requests still unanswered after {timeout:.0f} s"}
        time.sleep(poll)
        done = answers.read()
        left = sum(max(0, n - done.get(m, 0)) for m, n in target.items())
        try:
            now = inference_arrivals(metrics_url) or {}
        except OSError:
            now = {}
        if now and all(done.get(m, 0) >= n for m, n in now.items()):
            left = 0  # nothing in flight at all
