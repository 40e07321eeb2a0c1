#!/usr/bin/env python3
"""The readiness check of a TorchServe pod: exit 0 once every registered model has a READY worker.

TorchServe 0.12's ``GET /ping`` is no readiness signal: it opens its port before the models have loaded,
answers "Healthy" while a worker is still loading (and for ``max_retry_timeout``, 5 minutes, after a
worker failed to load), and with no model registered at all (an archive that failed) it is "Healthy" for
good (pytorch/serve#2099, #3047). A pod probed on ``/ping`` is put behind the Service before it can answer,
and a rollout with ``maxUnavailable: 0`` replaces good pods by ones whose model never loads.

This asks the management API on loopback instead: ``GET /models`` (every model), then ``GET /models/NAME``
(the default version's workers). Ready: at least one model, and each with a worker whose status is READY;
else exit 1 with one line saying which is not. Standard library only (the exec probe of
deploy/kubernetes, copied into the serving image as ``/usr/local/bin/ts-ready``; ``tests/deploy``
runs it against a real TorchServe). A management key (token authorization on) comes from
``TS_MANAGEMENT_KEY`` or ``--key-file`` (TorchServe's ``key_file.json``). Proxy variables (``HTTP_PROXY``, which
some clusters inject into every pod) are ignored: the server is on loopback. All requests together end within
``--deadline`` seconds, below the probe's ``timeoutSeconds``, so a slow answer is "not ready", not a killed probe.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
import urllib.request

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
DEADLINE_S = 4.0  # all requests together; deploy/kubernetes' probes give it timeoutSeconds 6 (tests/deploy checks)


def _get(url: str, key: str | None, timeout: float, deadline: float):
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no complete answer within the deadline")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with DIRECT.open(request, timeout=min(timeout, left)) as answer:
        return json.load(answer)


def problem(management_url: str, *, key: str | None = None, timeout: float = 2.0,
            deadline: float | None = None) -> str | None:
    """Why the server is not ready, or None when every registered model has a READY worker; ``deadline``: the
    ``time.monotonic()`` by which every answer must be in (default: ``timeout`` per request only)."""
    deadline = deadline if deadline is not None else float("inf")
    base = management_url.rstrip("/")
    names, token = [], ""
    while True:  # the listing is paged (100 a page by default)
        page = _get(f"{base}/models?limit=1000" + (f"&next_page_token={token}" if token else ""), key, timeout,
                    deadline)
        names += [m["modelName"] for m in page.get("models", [])]
        token = page.get("nextPageToken")
        if not token:
            break
    if not names:
        return "no model is registered (an archive that failed to load leaves none)"
    for name in names:
        versions = _get(f"{base}/models/{urllib.parse.quote(name, safe='')}", key, timeout, deadline)
        workers = [w for v in versions for w in v.get("workers", [])]
        if not any(w.get("status") == "READY" for w in workers):
            return f"model {name} has no READY worker (workers: {[w.get('status') for w in workers] or 'none'})"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ts-ready", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8081", help="TorchServe's management API")
    p.add_argument("--key-file", help="TorchServe's key_file.json, for its management key (token authorization)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per request")
    p.add_argument("--deadline", type=float, default=DEADLINE_S,
                   help="seconds for all requests together (keep it below the probe's timeoutSeconds)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.deadline
    key = os.environ.get("TS_MANAGEMENT_KEY")
    try:
        if args.key_file:
            with open(args.key_file) as f:
                key = json.load(f)["management"]["key"]
        why = problem(args.url, key=key, timeout=args.timeout, deadline=deadline)
    except (OSError, ValueError, KeyError, TypeError) as e:  # not up yet, refused, a body that is not the API's
        why = f"the management API at {args.url} did not answer as TorchServe's: {type(e).__name__}: {e}"
    print(f"not ready: {why}" if why else "ready", file=sys.stderr if why else sys.stdout)
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
