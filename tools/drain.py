"""Drain a TorchServe: wait until the inference requests it has received are answered.

TorchServe 0.12 does not drain by itself: SIGTERM (which is also all ``torchserve --stop`` does)
closes every client connection at once, so requests in flight get a connection reset and no HTTP
answer (measured; upstream issue pytorch/serve#2008). Unregistering the model is no drain either:
``DELETE /models/NAME`` with a batch in flight answered 500 ConcurrentModificationException and left
those requests hanging without an answer. So a stop (``TorchServe.stop(drain_timeout=...)``, and
``python -m scripts.ts_server stop``) first waits until the requests that had arrived are answered,
counted from the frontend's own records: arrivals per model from ``ts_inference_requests_total`` on
``/metrics`` (needs ``metrics_mode=prometheus``), answers from the lines of ``access_log.log`` written
since the server started. Then it sends SIGTERM. TorchServe cannot refuse new connections meanwhile:
requests that arrive during the drain may still be cut, so take the instance out of rotation first.

What TorchServe 0.12 counts and logs, per route (measured; tests/integration/test_prod_config.py):

* Arrivals: every HTTP inference route (``/predictions/M[/V]``, ``/explanations/M[/V]``,
  ``/v1/models/M:predict`` and ``:explain``, ``/v2/models/M/infer`` and ``/explain``,
  ``/invocations?model_name=M``, ``/models/M/invoke``, ``/M/predict``) and gRPC
  ``InferenceAPIsService/Predictions`` / ``StreamPredictions`` add 1 to
  ``ts_inference_requests_total{model_name="M"}`` once the request is accepted. The Open Inference
  Protocol's gRPC ``ModelInfer`` adds nothing (TorchServe's OpenInferenceProtocolImpl does not count
  it), so no drain built on TorchServe's records can wait for one; ``/v2/models/M/versions/V/infer``
  is answered 501 without being counted.
* Answers: one access-log line per answer, HTTP (``"POST URI HTTP/1.1" STATUS MS``) and gRPC alike
  (``"gRPC org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions HTTP/2.0" CODE MS``,
  written by the gRPC interceptor when the call closes), written on the thread that answers: a
  model's worker thread ``W-PORT-MODEL_VERSION`` for every accepted request, a Netty or gRPC thread
  for what is refused before it is counted (a wrong or expired key: 400; an unknown model or version:
  404 / gRPC INTERNAL; an undecodable body: 500; the 501 above) and for a full job queue (HTTP 503,
  after the arrival was counted). The gRPC line does not name the model (it is in the body).

What those records cannot show, the workers' own log can: every job, whatever its route, is taken
from the model's queue by a worker thread, which logs (in ``ts_log.log``) ``get first job`` when it
takes the first job of a batch (TRACE, ``org.pytorch.serve.wlm.Model``), ``Flushing req.cmd`` when it
sends the batch to its Python process and ``Backend response time`` when the answers are back (or
``Backend worker thread exception`` / a ``State change`` when the process died, which answers the
batch with errors). A worker is busy from the first to one of the last; a job waits in the queue only
while every worker of its model is busy. So, given ``ts_log``, the drain also waits until no worker
is busy, twice ``settle`` seconds apart with no worker line in between (log4j writes asynchronously
and a job leaves the queue a moment before its line is written): that covers ``ModelInfer``, and
every other job TorchServe took in but did not count. It cannot cover a model whose workers are all
gone (crashed and restarting), whose queued jobs wait for the restart.

So ``tools.torchserve.TorchServe`` starts TorchServe with its own log4j2.xml, TorchServe's with the
thread name added to the access log (``%d{ISO8601} [%t] - %m%n``) and TRACE for
``org.pytorch.serve.wlm.Model`` (two lines per batch), and an answer is a line of an
inference route on a worker thread, attributed to that worker's model (gRPC included), or an HTTP 503
of an inference route on any thread. Refusals are then never taken for answers. A gRPC call that the
client cancels (or whose deadline passes) is closed CANCELLED by TorchServe's cancel handler on a gRPC
thread, and its job's answer is never logged: that line counts as an answer to some model. A
``/invocations`` without ``?model_name`` (TorchServe's only model) counts for its worker's model. Left
without a logged answer: a gRPC call refused by a full queue (its INTERNAL is indistinguishable from an
unknown model's), and the bidirectional ``StreamPredictions2``, which counts every message but is logged
once per stream. Their arrivals stay counted for the server's life; given ``ts_log``, a drain ends anyway
once every worker has been idle for ``stale`` seconds with none starting or restarting (a counted job
waits in the queue only while its model's workers are busy, starting or restarting), and says how many
arrivals had no answer. From an access log without thread names (a TorchServe started otherwise)
HTTP lines count by the model in their URI, refusals included, and gRPC lines count as answers to
any model: refusals of a served model's requests during a drain can then end it early.
"""
from __future__ import annotations

import os
import re
import time
import urllib.parse

from tools.client import urlopen
from tools.log_tail import LogTail

ARRIVALS_RE = re.compile(r'^ts_inference_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$', re.M)
ACCESS_RE = re.compile(r'"(?P<method>[A-Za-z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d+)')
THREAD_RE = re.compile(r'^\S+ \[(?P<thread>[^\]]*)\] - ')  # the access-log pattern of tools.torchserve
WORKER_RE = re.compile(r'^W-\d+-(?P<name>.+_[^_]*)$')          # W-PORT-MODEL_VERSION (WorkerThread.getWorkerName)
# The gRPC calls that TorchServe 0.12 counts in ts_inference_requests_total (InferenceImpl); the OIP
# service's ModelInfer and the management service are not counted, Ping is no inference.
GRPC_INFERENCE = {f"org.pytorch.serve.grpc.inference.InferenceAPIsService/{m}"
                  for m in ("Predictions", "StreamPredictions", "StreamPredictions2")}
GRPC_CANCELLED = "1"  # io.grpc.Status.Code.CANCELLED, as the gRPC interceptor logs it


def inference_arrivals(metrics_url: str, timeout: float = 5) -> dict[str, int] | None:
    """Inference requests received per model name since start (``ts_inference_requests_total``, all
    versions), or None when ``/metrics`` is empty (TorchServe's ``metrics_mode`` is not prometheus)."""
    with urlopen(f"{metrics_url}/metrics", timeout=timeout) as r:
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
    if len(parts) >= 2 and parts[0] in ("predictions", "explanations"):
        return parts[1]
    if parts == ["invocations"]:
        return (urllib.parse.parse_qs(query).get("model_name") or [None])[0]
    if len(parts) == 3 and parts[0] == "models" and parts[2] == "invoke":
        return parts[1]
    if len(parts) in (2, 3) and parts[-1] == "predict":
        return parts[0]
    if len(parts) == 3 and parts[:2] == ["v1", "models"] and (":predict" in parts[2] or ":explain" in parts[2]):
        return parts[2].split(":")[0]  # KServe v1 (TorchServe takes the name before the first ':')
    if len(parts) in (4, 6) and parts[:2] == ["v2", "models"] and parts[-1] in ("infer", "explain"):
        return parts[2]  # Open Inference Protocol, with or without /versions/V (0.12 answers that one 501)
    return None


def worker_model(name: str, models=()) -> str:
    """The model of a worker thread's ``MODEL_VERSION``: the longest of ``models`` (the names counted on
    ``/metrics``) that it starts with before an ``_``, else what precedes its last ``_`` (TorchServe joins
    the two with ``_`` and both may hold one: model ``a`` version ``1_0`` is ``a_1_0``)."""
    known = [m for m in models if name.startswith(f"{m}_")]
    return max(known, key=len) if known else name.rsplit("_", 1)[0]


def answered_model(line: str, models=()) -> tuple[str | None, bool]:
    """``(model, grpc_unattributed)`` for one access-log line: the model whose counted inference request
    it answers (None: not such an answer), or ``(None, True)`` for a gRPC inference answer in a log
    without thread names, which names no model. ``models``: the served model names, which tell a gRPC
    answer's model from its worker thread's name (:func:`worker_model`). See the module's docstring for
    the rules."""
    m = ACCESS_RE.search(line)
    if not m or m["method"] == "OPTIONS":
        return None, False
    t = THREAD_RE.match(line)
    worker = WORKER_RE.match(t["thread"]) if t else None
    if m["method"] == "gRPC":
        if m["uri"] not in GRPC_INFERENCE:
            return None, False  # Ping, ModelInfer (never counted as an arrival), management
        if t is None:
            return None, True
        if worker:
            return worker_model(worker["name"], models), False
        # not on a worker: refused before it was counted, or (CANCELLED) a counted call the client cancelled
        # (a deadline), closed by TorchServe's cancel handler; its job's answer is then never logged
        # (a StreamPredictions2 stream's cancel handler is set once per stream, counted messages or not)
        return None, m["status"] == GRPC_CANCELLED and not m["uri"].endswith("/StreamPredictions2")
    name = model_of_uri(m["uri"])
    if name is None and worker and m["uri"].partition("?")[0].rstrip("/") == "/invocations":
        name = worker_model(worker["name"], models)  # no ?model_name: TorchServe's only model answered it
    if name is None or (t is not None and worker is None and m["status"] != "503"):
        return None, False  # not inference, or refused before it was counted
    return name, False


TS_LOG_RE = re.compile(r'^\S+ \[\s*[A-Z]+\s*\] (?P<thread>\S+) (?P<logger>\S+) - (?P<msg>.*)$')
STATE_RE = re.compile(r'^(?P<worker>\S+) State change \S+ -> (?P<state>[A-Z_]+)')  # WorkerThread.setState (DEBUG)
STARTING = "Worker cmdline: "  # WorkerLifeCycle (DEBUG), on the worker's thread, before its process starts
LOADED, SCALED_DOWN = "WORKER_MODEL_LOADED", "WORKER_SCALED_DOWN"
BUSY_MESSAGES = ("get first job: ", "Flushing req.cmd ")            # a batch taken, a batch sent to the backend
IDLE_MESSAGES = ("Backend response time: ", "Backend worker thread exception")  # answered, or died
WORKER_THREAD_RE = re.compile(r'^W-\d+-.+_[^_]*$')


def worker_event(line: str) -> tuple[str, bool] | None:
    """``(worker thread, busy after this line)`` for a ``ts_log.log`` line of a worker's batch cycle,
    else None."""
    m = TS_LOG_RE.match(line)
    if not m or not WORKER_THREAD_RE.match(m["thread"]):
        return None
    msg = m["msg"]
    if msg.startswith(BUSY_MESSAGES):
        return m["thread"], True
    if msg.startswith(IDLE_MESSAGES) or " State change " in msg:
        return m["thread"], False
    return None


def worker_state(line: str) -> tuple[str, str] | None:
    """``(worker, new state)`` for a ``ts_log.log`` line of a worker's state change, ``(worker, "STARTING")``
    for the line a worker logs before it starts its process, else None."""
    m = TS_LOG_RE.match(line)
    if m and m["msg"].startswith(STARTING) and WORKER_THREAD_RE.match(m["thread"]):
        return m["thread"], "STARTING"
    s = STATE_RE.match(m["msg"]) if m else None
    return (s["worker"], s["state"]) if s else None


class WorkerActivity:
    """Which TorchServe worker threads are busy with a batch, read incrementally from ``ts_log.log``
    from ``offset`` on (the size it had when the server started). ``events`` counts the batch-cycle
    lines read so far (TorchServe's log4j2.xml writes each ``org.pytorch.serve`` line twice, which does
    not change who is busy); ``down``: the workers starting, or stopped and waiting for their restart (their
    model's queued jobs wait for them), i.e. whose last state is not loaded; a worker scaled down is gone
    for good (the ``WORKER_STOPPED`` it logs next, as its thread ends, is no restart to wait for);
    ``states``: whether the log shows workers' states at all (TorchServe's DEBUG lines)."""

    def __init__(self, path: str | os.PathLike, offset: int = 0, inode: int | None = None):
        self.tail = LogTail(path, offset, inode)
        self.busy: dict[str, bool] = {}
        self.states: dict[str, str] = {}
        self.events = 0

    @property
    def down(self) -> list[str]:
        return sorted(w for w, state in self.states.items() if state not in (LOADED, SCALED_DOWN))

    def read(self) -> list[str]:
        """The busy worker threads, sorted."""
        for line in self.tail.lines():
            event = worker_event(line)
            if event is not None:
                self.busy[event[0]] = event[1]
                self.events += 1
            if (state := worker_state(line)) is not None and self.states.get(state[0]) != SCALED_DOWN:
                self.states[state[0]] = state[1]
        return sorted(t for t, b in self.busy.items() if b)


class AccessLogAnswers:
    """Inference answers per model, read incrementally from ``access_log.log`` from ``offset`` on
    (TorchServe writes one line per response, just before it writes the response itself); ``grpc``:
    gRPC inference answers that the log does not attribute to a model (a log without thread names)."""

    def __init__(self, path: str | os.PathLike, offset: int = 0, inode: int | None = None):
        self.tail = LogTail(path, offset, inode)
        self.counts: dict[str, int] = {}
        self.grpc = 0

    @property
    def lost(self) -> bool:
        """Answers may be missing: the log rolled over into a file that could not be read (:class:`LogTail`)."""
        return self.tail.lost

    def read(self, models=()) -> dict[str, int]:
        """Answers per model so far; ``models``: the served model names (:func:`answered_model`)."""
        for line in self.tail.lines():
            name, unattributed = answered_model(line, models)
            if name is not None:
                self.counts[name] = self.counts.get(name, 0) + 1
            self.grpc += unattributed
        return dict(self.counts)


def outstanding(arrivals: dict[str, int], answers: dict[str, int], grpc_answers: int = 0) -> int:
    """Requests counted as arrived but not yet answered: per model the arrivals beyond its answers,
    summed, less the gRPC answers that the log attributes to no model."""
    return max(0, sum(max(0, n - answers.get(m, 0)) for m, n in arrivals.items()) - grpc_answers)


def drain(metrics_url: str, access_log: str | os.PathLike, *, offset: int = 0, inode: int | None = None,
          ts_log: str | os.PathLike | None = None, ts_log_offset: int = 0, ts_log_inode: int | None = None,
          timeout: float = 30, poll: float = 0.05, settle: float = 0.25, stale: float = 2.0) -> dict:
    """Wait until every inference request that had arrived when this was called is answered.

    Counted requests: done when the answers logged since start cover, model by model, the arrivals
    counted at the call, or when nothing counted is in flight at all. Exact when one worker serves each
    model (TorchServe's job queue is first in, first out); with several workers a later batch can finish
    first. With ``ts_log`` (``ts_log.log``, read from ``ts_log_offset``) it also waits until no worker is
    busy, ``settle`` seconds apart twice (module docstring): that covers what TorchServe does not count
    (gRPC ``ModelInfer``), and under continuous traffic it waits for a pause, or gives up after
    ``timeout`` seconds with the busy workers named. Both logs are followed across log4j2's rollovers from
    the file that had inode ``inode`` / ``ts_log_inode`` at the offset (:class:`tools.log_tail.LogTail`); if
    the access log rolled into a file that cannot be read, the answers are not countable and, given
    ``ts_log``, the workers' idleness alone decides (``in_flight`` is then None). Counted arrivals whose
    answer is never logged (a gRPC call refused by a full queue, a ``StreamPredictions2`` stream's later
    messages) would otherwise hold every later drain of the server for its whole ``timeout``: given
    ``ts_log``, once no worker has been busy or has logged a batch for ``stale`` seconds and none is starting
    or down (:class:`WorkerActivity`; only where the log shows the workers' states, TorchServe's DEBUG lines,
    and none of it was lost to a rollover), no counted request can still be queued, and the drain ends, the
    unanswered count in ``reason``. Returns ``{"drained", "in_flight", "seconds", "reason", "busy_workers"}``:
    ``in_flight`` counted requests at the call, ``busy_workers`` the workers busy at the call (a list, empty
    without ``ts_log``), ``reason`` why it was not drained, or a note on a drain that ended as above.
    """
    start = time.time()
    try:
        target = inference_arrivals(metrics_url)
    except OSError as e:
        return {"drained": False, "in_flight": None, "seconds": 0.0, "reason": f"/metrics unreachable: {e}",
                "busy_workers": []}
    if target is None:
        return {"drained": False, "in_flight": None, "seconds": 0.0,
                "reason": "/metrics is empty: the drain needs metrics_mode=prometheus", "busy_workers": []}
    answers = AccessLogAnswers(access_log, offset, inode)
    workers = WorkerActivity(ts_log, ts_log_offset, ts_log_inode) if ts_log is not None else None

    def counted(done: dict[str, int], arrivals: dict[str, int]) -> int | None:
        """Counted requests not answered; None when answers were lost to a rollover and the workers can tell."""
        return None if answers.lost and workers is not None else outstanding(arrivals, done, answers.grpc)
    models = set(target)  # the served model names, for the gRPC answers' worker threads
    done = answers.read(models)
    in_flight = counted(done, target)
    busy_at_call = workers.read() if workers is not None else []
    left, busy = in_flight or 0, busy_at_call
    # quiet from now, after the first reads (which may take longer than settle): a line flushed meanwhile counts
    quiet_since, events = (time.time() if not busy else None), (workers.events if workers is not None else 0)

    def result(drained: bool, reason: str = "") -> dict:
        return {"drained": drained, "in_flight": in_flight, "seconds": round(time.time() - start, 3),
                "reason": reason, "busy_workers": busy_at_call}
    while True:
        now_t = time.time()
        quiet = workers is not None and quiet_since is not None
        if left == 0 and (workers is None or (quiet and now_t - quiet_since >= settle)):
            return result(True)
        if left and quiet and now_t - quiet_since >= stale and workers.states and not workers.down \
                and not workers.tail.lost:  # the log shows every worker's state, none starting or restarting
            return result(True, f"{left} counted arrivals have no logged answer while every worker was idle for "
                                f"{stale:.0f} s (a gRPC call refused by a full queue, a StreamPredictions2 stream, "
                                "or a request TorchServe answered on no worker thread): none is queued")
        if now_t - start > timeout:
            if left:
                lost = " (the access log rolled over into a file that could not be read: answers may be missing)"
                return result(False, f"{left} of {in_flight} requests still unanswered after {timeout:.0f} s"
                                     + (lost if answers.lost else ""))
            return result(False, f"workers still busy after {timeout:.0f} s: {', '.join(busy) or 'between batches'}"
                                 " (requests TorchServe does not count, e.g. gRPC ModelInfer, or new traffic:"
                                 " take the instance out of rotation first)")
        time.sleep(poll)
        done = answers.read(models)  # before the arrivals: an answer read later may be a later arrival's
        left = counted(done, target) or 0
        try:
            now = inference_arrivals(metrics_url) or {}
        except OSError:
            now = {}
        models |= now.keys()
        if now and not counted(done, now):
            left = 0  # nothing counted in flight at all
        if workers is not None:
            busy = workers.read()
            if busy or workers.events != events:
                quiet_since = None if busy else time.time()
                events = workers.events
            elif quiet_since is None:
                quiet_since = time.time()