"""Load test for the classification endpoint.

    locust -f locustfile.py --headless -u 8 -r 8 -t 20s --host http://127.0.0.1:8080

Settings (environment variables, or the same names as locust options ``--images`` etc.):
  IMAGES      folder of images (searched recursively; .png/.jpg/.jpeg/.webp/.bmp/.gif/.tif/.tiff, hidden files
              skipped) or one image file; default data/fashion-mnist/test
  MODEL_NAME  model to call (/predictions/MODEL_NAME); default fmnist
  TOPK        optional X-Top-K header value (an integer >= 1)
  MAX_IMAGES  how many images to load into memory (default 500)
  TOKEN       optional inference key, sent as "Authorization: Bearer TOKEN" (TorchServe's token
              authorization: the "inference" key of key_file.json, e.g. with config.prod.properties)
  --final-stats PATH (an option only): the whole run's Aggregated figures as JSON, written when locust quits
              (locust's --csv is a snapshot taken once a second; tools/locust.py's summary reads this first)
  SCHEMA      the protocol and the expected answer:
              ours (default): raw bytes to /predictions/MODEL_NAME, {"predictions": [...]} back;
              stock: the same request, the {"class name": probability, ...} object of TorchServe's
              built-in image_classifier back;
              kserve_v1: {"instances": [{"data": "<b64>"}]} to /v1/models/MODEL_NAME:predict,
              {"predictions": [<one result object>]} back;
              oip_v2: the Open Inference Protocol, {"inputs": [{"name": "image", "shape": [1],
              "datatype": "BYTES", "data": ["<b64>"]}]} to /v2/models/MODEL_NAME/infer, the tensors
              labels/scores/indices of shape [1, k] back (what Triton/KServe v2 clients send)

Every response is checked: status 200, JSON with a non-empty "predictions" list whose entries have
"class", "index" and "confidence" (and exactly TOPK entries when TOPK is set). A wrong body counts
as a failure, and so does a request that got no answer (connection refused or reset, a timeout); a failure's
text is the fault alone (one row per fault in locust's table), the image that met it first is logged once.
Each image's request body is built once (base64 and JSON for kserve_v1/oip_v2), not per request. With
``--processes N`` the master only checks the folder; the workers read the images.
A bad setting (no images, an unknown SCHEMA, TOPK that is not an integer >= 1) stops locust at start-up
with one line. It runs from a checkout of this repository (locust puts the locustfile's folder on the import
path): the image listing is the core's ``inference.image_files``, standard library only.
"""
from __future__ import annotations

import base64
import itertools
import json
import logging
import mimetypes
import os
import random
from pathlib import Path

import gevent
from locust import FastHttpUser, events, task

from inference.image_files import IMAGE_EXTENSIONS, image_files  # standard library only: no torch in locust


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--images", default=os.environ.get("IMAGES", "data/fashion-mnist/test"), help="image folder")
    parser.add_argument("--model-name", default=os.environ.get("MODEL_NAME", "fmnist"), help="model to call")
    parser.add_argument("--topk", default=os.environ.get("TOPK", ""), help="X-Top-K header (empty: model default)")
    parser.add_argument("--max-images", default=os.environ.get("MAX_IMAGES", "500"),
                        help="images loaded into memory (an integer >= 1)")
    parser.add_argument("--schema", default=os.environ.get("SCHEMA", "ours"), choices=list(SCHEMAS),
                        help="expected response body")
    parser.add_argument("--token", default=os.environ.get("TOKEN", ""), is_secret=True,  # masked in the web UI
                        help="inference key (token authorization); write --token=KEY: a key may start with '-'")
    parser.add_argument("--final-stats", default="", help="write the whole run's Aggregated figures to this JSON "
                        "file when locust quits (its --csv holds the last snapshot, up to a second old)")


@events.quit.add_listener
def _final_stats(exit_code, **_):
    """``--final-stats PATH``: the ``Aggregated`` row of the whole run as locust's CSV defines it (requests over the
    time from the start to the last answer), taken when locust quits: the CSV, written once a second, is the
    last snapshot before the end, and the figures of a slow server's few requests moved with it."""
    environment = _ENVIRONMENT[0] if _ENVIRONMENT else None
    opts = getattr(environment, "parsed_options", None)
    if not getattr(opts, "final_stats", "") or type(environment.runner).__name__ == "WorkerRunner":
        return
    total = environment.stats.total
    figures = {"requests": total.num_requests, "failures": total.num_failures, "requests_per_s": total.total_rps,
               "failures_per_s": total.total_fail_per_sec,
               "percentiles": {f"{p * 100:g}%": total.get_response_time_percentile(p) if total.num_requests else None
                               for p in (0.5, 0.66, 0.75, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)}}
    Path(opts.final_stats).write_text(json.dumps(figures))


_ENVIRONMENT: list = []  # the quit event passes no environment: the init event's, kept here


def load_payloads(folder: str, limit, seed: int = 0, *, read: bool = True) -> list[tuple[str, bytes, str]]:
    """Up to ``limit`` image files under ``folder`` (or ``folder`` itself, one image file), listed as training and
    ``predict`` list a folder (``inference.image_files``: recursively, symlinked folders followed, hidden files and
    folders such as macOS ``._x.jpg`` or ``.thumbs/`` skipped), read into memory (``read=False``: listed only, the
    bytes empty); a mistake is one line (``SystemExit``)."""
    if not str(limit).strip().isdecimal() or int(limit) < 1:
        raise SystemExit(f"error: --max-images (MAX_IMAGES) must be an integer >= 1, not {limit!r}")
    try:
        paths = [Path(p) for p in image_files(folder, option="--images (IMAGES)")]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r} (set --images or "
                         "IMAGES)")
    paths = random.Random(seed).sample(paths, min(int(limit), len(paths)))
    try:
        return [(p.name, p.read_bytes() if read else b"", mimetypes.guess_type(p.name)[0] or "application/octet-stream")
                for p in paths]
    except OSError as e:
        raise SystemExit(f"error: cannot read {e.filename}: {e.strerror}") from None


def parse_topk(value: str) -> int | None:
    """``--topk``/``TOPK``: empty (the model's default) or an integer >= 1."""
    if not value:
        return None
    if not value.strip().isdecimal() or int(value) < 1:
        raise SystemExit(f"error: --topk (TOPK) must be an integer >= 1, not {value!r}")
    return int(value)


PAYLOADS: list = []
_BODIES: dict = {}  # (schema, topk) -> {payload index: request}: base64 and JSON encoded once, not per request
_REPORTED: set = set()  # failure texts already logged with the image that met them first
_LOADED: list = [None]  # the (folder, limit) PAYLOADS hold: loaded once, again only when the web UI changed them


def _payloads_for(opts, *, role: str = "") -> None:
    """Load the payloads; the master of ``--processes N`` sends nothing: it only checks the folder."""
    if role == "MasterRunner":
        load_payloads(opts.images, opts.max_images, read=False)
        return
    key = (opts.images, opts.max_images)
    if _LOADED[0] != key:
        PAYLOADS[:] = load_payloads(opts.images, opts.max_images)
        _BODIES.clear()
        _LOADED[0] = key


@events.init.add_listener
def _check(environment, **_):
    """At start-up, before any user runs: a mistake stops locust with one line (argparse does not check an
    environment variable's default against ``choices``)."""
    _ENVIRONMENT[:] = [environment]
    opts = environment.parsed_options
    if opts is None:  # locust used as a library, without its command line
        return
    if opts.schema not in SCHEMAS:
        raise SystemExit(f"error: --schema (SCHEMA) {opts.schema!r} is not one of {', '.join(SCHEMAS)}")
    if parse_topk(opts.topk) and opts.schema == "stock":
        raise SystemExit("error: --topk (TOPK) does not apply to --schema stock: TorchServe's image_classifier "
                         "always answers its top 5")
    if opts.final_stats:  # found out at the end of the run, the figures were lost
        folder = Path(opts.final_stats).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise SystemExit(f"error: --final-stats {opts.final_stats}: {folder} is not a writable folder")
    role = type(environment.runner).__name__
    _payloads_for(opts, role=role)
    if getattr(opts, "headless", False) and environment.host and role != "WorkerRunner":
        _check_host(environment.host)


def _check_host(host: str) -> None:
    """A headless run against a host where nothing listens spent its whole duration on connection errors and wrote
    a report of 100% failures: one line instead. Any HTTP answer (401 of a server with token authorization too)
    will do; only a refused or unreachable connection stops the run."""
    import ssl
    import urllib.error
    import urllib.request
    # as locust's FastHttpUser connects: no proxy from the environment, no certificate check (insecure = True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
    try:
        opener.open(f"{host.rstrip('/')}/ping", timeout=10).close()
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: nothing answers at {host} ({getattr(e, 'reason', e)}): start the server first "
                         "(make serve & make wait), or give --host") from None


@events.test_start.add_listener
def _load(environment, **_):
    """The web UI may have changed --images, --max-images or --topk since start-up: a mistake there stops this
    test with its one line in the log, not the whole locust process."""
    try:
        parse_topk(environment.parsed_options.topk)
        _payloads_for(environment.parsed_options, role=type(environment.runner).__name__)
    except SystemExit as e:
        logging.getLogger("locustfile").error(str(e))
        if environment.runner is not None:
            gevent.spawn(environment.runner.stop)


def check_stock_body(body) -> str | None:
    """TorchServe's image_classifier answers {"class name": probability, ...} (top 5)."""
    if not isinstance(body, dict) or not body:
        return "expected a non-empty JSON object of class -> probability"
    if not all(_probability(v) for v in body.values()):
        return "probabilities must be numbers in [0, 1]"
    return None


def _probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def check_body(body: dict, topk: int | None) -> str | None:
    """Return what is wrong with a prediction body of this project's handler, or None."""
    preds = body.get("predictions") if isinstance(body, dict) else None
    if not isinstance(preds, list) or not preds:
        return "no predictions"
    if topk and len(preds) != topk:
        return f"{len(preds)} predictions, expected {topk}"
    for p in preds:
        if not (isinstance(p, dict) and isinstance(p.get("class"), str) and isinstance(p.get("index"), int)
                and not isinstance(p.get("index"), bool) and _probability(p.get("confidence"))):
            return f"bad prediction entry {str(p)[:100]}"
    return None


def check_kserve_v1_body(body, topk: int | None) -> str | None:
    preds = body.get("predictions") if isinstance(body, dict) else None
    if not isinstance(preds, list) or len(preds) != 1 or not isinstance(preds[0], dict):
        return "expected {\"predictions\": [<one result object>]}"
    return check_body(preds[0], topk)


OIP_TENSORS = {"labels": ("BYTES", str), "scores": ("FP32", float), "indices": ("INT64", int)}


def check_oip_v2_body(body, topk: int | None) -> str | None:
    listed = body.get("outputs") if isinstance(body, dict) else None
    if not isinstance(listed, list) or not all(isinstance(o, dict) for o in listed):
        return "expected \"outputs\": a list of tensors"
    outputs = {str(o.get("name")): o for o in listed}
    if not set(OIP_TENSORS) <= set(outputs) <= {*OIP_TENSORS, "tta_applied"}:  # tta_applied: adaptive TTA
        return f"expected outputs labels, scores, indices (and tta_applied); got {sorted(outputs)}"
    shape = outputs["scores"].get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == 1 and isinstance(shape[1], int)
            and shape[1] >= 1 and (not topk or shape[1] == topk)):
        return f"scores shape {shape}, expected [1, {topk or 'k'}]"
    for name, (datatype, kind) in OIP_TENSORS.items():
        data = outputs[name].get("data")
        if outputs[name].get("datatype") != datatype or outputs[name].get("shape") != shape:
            return f"{name}: expected datatype {datatype} and shape {shape}"
        if not isinstance(data, list) or len(data) != shape[1]:
            return f"{name}: expected {shape[1]} values (shape {shape})"
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in data):
            return f"{name}: expected {kind.__name__} values"
    if not all(_probability(v) for v in outputs["scores"]["data"]):
        return "scores must be probabilities"
    applied = outputs.get("tta_applied")
    if applied is not None and not (applied.get("shape") == [1] and isinstance(applied.get("data"), list)
                                    and len(applied["data"]) == 1 and isinstance(applied["data"][0], bool)):
        return "tta_applied: expected one BOOL value"
    return None


def _raw(data: bytes, ctype: str, topk: int | None):
    return {"data": data, "headers": {"Content-Type": ctype, **({"X-Top-K": str(topk)} if topk else {})}}


def _json(body: dict):
    return {"data": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def _kserve_v1(data: bytes, ctype: str, topk: int | None):
    return _json({"instances": [{"data": base64.b64encode(data).decode()}], **({"topk": topk} if topk else {})})


def _oip_v2(data: bytes, ctype: str, topk: int | None):
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}]}
    return _json({**body, **({"parameters": {"topk": topk}} if topk else {})})


# schema -> (route, request builder, answer check)
SCHEMAS = {
    "ours": ("/predictions/{model}", _raw, check_body),
    "stock": ("/predictions/{model}", _raw, lambda body, topk: check_stock_body(body)),
    "kserve_v1": ("/v1/models/{model}:predict", _kserve_v1, check_kserve_v1_body),
    "oip_v2": ("/v2/models/{model}/infer", _oip_v2, check_oip_v2_body),
}


class ClassifierUser(FastHttpUser):
    """geventhttpclient (``FastHttpUser``), not requests: the load generator shares the machine with the server
    in ``make bench``, and requests' client cost several times more CPU per request."""
    def on_start(self):
        opts = self.environment.parsed_options
        route, self.build, check = SCHEMAS[opts.schema]
        self.path = route.format(model=opts.model_name)
        self.topk = parse_topk(opts.topk)
        self.auth = {"Authorization": f"Bearer {opts.token}"} if opts.token else {}
        self.payloads = itertools.cycle(random.sample(range(len(PAYLOADS)), len(PAYLOADS)))
        self.bodies = _BODIES.setdefault((opts.schema, self.topk), {})
        self.check = lambda body: check(body, self.topk)

    def _request(self, i: int) -> dict:
        if i not in self.bodies:  # built on first use: a user's first pass over 12 MP photos is not one long stall
            self.bodies[i] = self.build(PAYLOADS[i][1], PAYLOADS[i][2], self.topk)
        request = self.bodies[i]
        return {**request, "headers": {**request.get("headers", {}), **self.auth}}

    @staticmethod
    def _fail(r, name: str, problem: str) -> None:
        """One failure row per kind of fault (locust groups failures by their text); the image that met it first
        is logged once."""
        r.failure(problem)
        if problem not in _REPORTED:
            _REPORTED.add(problem)
            logging.getLogger("locustfile").warning("%s (first met with %s)", problem, name)

    @task
    def classify(self):
        i = next(self.payloads)
        name = PAYLOADS[i][0]
        with self.client.post(self.path, **self._request(i), name=self.path, catch_response=True) as r:
            if not r.status_code:  # no answer at all: locust's stand-in response carries the error, no text
                r.failure(f"no response: {getattr(r, 'error', None) or 'connection failed'}")
                return
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                body = json.loads(r.content)  # not r.json(): its text is None where no charset can be told
            except (ValueError, TypeError):
                self._fail(r, name, "response is not JSON")
                return
            try:
                problem = self.check(body)
            except Exception as e:  # a body of a shape no check foresaw: still this request's failure
                problem = f"unexpected body ({type(e).__name__}: {e})"
            if problem:
                self._fail(r, name, problem)
            else:
                r.success()
