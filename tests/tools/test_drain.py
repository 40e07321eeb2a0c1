"""The drain's bookkeeping without a TorchServe: which access-log lines are answers to counted requests
(every inference route, gRPC included; refusals excluded), and ``drain`` / ``make stop`` against a
stand-in ``/metrics``. The lines are TorchServe 0.12's, as measured (tests/integration/test_prod_config.py
runs the same against a real server)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tools import REPO
from tools.drain import (
    AccessLogAnswers,
    WorkerActivity,
    answered_model,
    drain,
    model_of_uri,
    outstanding,
    worker_event,
    worker_model,
)

GRPC = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
OIP = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"


def line(thread: str | None, method: str, uri: str, status: int, protocol: str = "HTTP/1.1") -> str:
    """An access-log line as TorchServe writes it: with the thread (tools.torchserve's pattern) or without
    (TorchServe's default pattern)."""
    where = f" [{thread}]" if thread else ""
    return f'2026-12-02T02:23:36,070{where} - /127.0.0.1:36684 "{method} {uri} {protocol}" {status} 12\n'


def grpc_line(thread: str | None, call: str, code: int) -> str:
    return line(thread, "gRPC", call, code, "HTTP/2.0")


@pytest.mark.parametrize("uri, model", [
    ("/explanations/shapes", "shapes"), ("/explanations/shapes/2.0", "shapes"),
    ("/v1/models/m:explain", "m"), ("/v2/models/m/explain", "m"), ("/v1/models/a.b:predict", "a.b"),
    ("/v2/health/live", None), ("/v1/models/m", None), ("/token?type=inference", None),
])
def test_model_of_uri_covers_every_counted_route(uri, model):
    assert model_of_uri(uri) == model


@pytest.mark.parametrize("text, expected", [
    # answered by the model's worker thread: an answer, whatever the route or status
    (line("W-9000-shapes_1.0", "POST", "/predictions/shapes", 200), ("shapes", False)),
    (line("W-9000-shapes_1.0", "POST", "/explanations/shapes", 503), ("shapes", False)),
    (line("W-9001-shapes_2.0", "POST", "/v2/models/shapes/infer", 200), ("shapes", False)),
    (line("W-9000-shapes_1.0", "POST", "/v1/models/shapes:explain", 503), ("shapes", False)),
    (grpc_line("W-9000-shapes_ts_1.0", f"{GRPC}/Predictions", 0), ("shapes_ts", False)),
    (grpc_line("W-9000-shapes_1.0", f"{GRPC}/StreamPredictions", 13), ("shapes", False)),
    # refused on a Netty / gRPC thread before TorchServe counted it: no answer
    (line("epollEventLoopGroup-3-3", "POST", "/predictions/shapes", 400), (None, False)),   # no / wrong key
    (line("epollEventLoopGroup-3-1", "POST", "/predictions/shapes/9.9", 404), (None, False)),
    (line("epollEventLoopGroup-3-1", "POST", "/v2/models/shapes/versions/1.0/infer", 501), (None, False)),
    (grpc_line("grpc-default-executor-0", f"{GRPC}/Predictions", 13), (None, False)),       # model not found
    # a counted gRPC call the client cancelled (deadline): closed CANCELLED by the cancel handler on a gRPC
    # thread, its job's answer never logged: an answer to some model
    (grpc_line("grpc-default-executor-2", f"{GRPC}/Predictions", 1), (None, True)),
    # ... but not a cancelled bidirectional stream: its cancel handler is set once per stream, counted or not
    (grpc_line("grpc-default-executor-2", f"{GRPC}/StreamPredictions2", 1), (None, False)),
    # /invocations without ?model_name: TorchServe's only model, answered on its worker thread
    (line("W-9000-shapes_1.0", "POST", "/invocations", 200), ("shapes", False)),
    (line("epollEventLoopGroup-3-1", "POST", "/invocations", 400), (None, False)),
    # a full queue answers 503 on the Netty thread after counting the arrival: an answer
    (line("epollEventLoopGroup-3-2", "POST", "/predictions/shapes", 503), ("shapes", False)),
    # not inference, or never counted as an arrival
    (grpc_line("W-9000-shapes_1.0", f"{OIP}/ModelInfer", 0), (None, False)),
    (grpc_line("pool-2-thread-3", f"{GRPC}/Ping", 0), (None, False)),
    (line("W-9000-extra_1.0", "POST", "/models?url=extra.mar&synchronous=true", 200), (None, False)),
    (line("epollEventLoopGroup-4-1", "GET", "/metrics", 200), (None, False)),
    (line("W-9000-shapes_1.0", "OPTIONS", "/predictions/shapes", 200), (None, False)),
    # TorchServe's default pattern (no thread): by the URI; gRPC answers name no model
    (line(None, "POST", "/predictions/a", 200), ("a", False)),
    (line(None, "POST", "/predictions/a", 400), ("a", False)),
    (grpc_line(None, f"{GRPC}/Predictions", 0), (None, True)),
    (grpc_line(None, f"{OIP}/ModelInfer", 0), (None, False)),
])
def test_which_lines_answer_a_counted_request(text, expected):
    assert answered_model(text) == expected


@pytest.mark.parametrize("name, models, model", [
    ("shapes_1_0", {"shapes"}, "shapes"),                        # a version with "_" (model-config: "1_0")
    ("shapes_ts_1.0", {"shapes", "shapes_ts"}, "shapes_ts"),    # two served names, one the other's prefix
    ("shapes_1.0", {"shapes", "shapes_ts"}, "shapes"),
    ("shapes_ts_1.0", set(), "shapes_ts"),                     # no names known: before the version's "_"
])
def test_a_grpc_answer_belongs_to_the_served_model_its_worker_names(name, models, model):
    assert worker_model(name, models) == model
    assert answered_model(grpc_line(f"W-9000-{name}", f"{GRPC}/Predictions", 0), models) == (model, False)


def test_outstanding_subtracts_unattributed_grpc_answers():
    assert outstanding({"a": 3, "b": 1}, {"a": 1}) == 3
    assert outstanding({"a": 3, "b": 1}, {"a": 1}, grpc_answers=2) == 1
    assert outstanding({"a": 1}, {"a": 5}) == 0          # more answers than arrivals of a do not cover b
    assert outstanding({"a": 1, "b": 1}, {"a": 5}) == 1


def test_access_log_answers_read_grpc_lines_incrementally(tmp_path):
    log = tmp_path / "access_log.log"
    log.write_text(grpc_line("W-9000-m_1.0", f"{GRPC}/Predictions", 0) + grpc_line(None, f"{GRPC}/Predictions", 0))
    answers = AccessLogAnswers(log)
    assert answers.read() == {"m": 1} and answers.grpc == 1
    with open(log, "a") as f:
        f.write(line("W-9000-m_1.0", "POST", "/v2/models/m/infer", 200) + grpc_line("W-9000-m_1.0", GRPC, 0)[:30])
    assert answers.read() == {"m": 2} and answers.grpc == 1


def ts_line(thread: str, level: str, logger: str, msg: str) -> str:
    """A ts_log.log line as TorchServe 0.12's log4j2.xml writes it ("%d{ISO8601} [%-5p] %t %c - %m%n")."""
    return f"2026-12-02T15:22:08,254 [{level:<5}] {thread} org.pytorch.serve.wlm.{logger} - {msg}\n"


W = "W-9000-slow_1.0"
TAKEN = ts_line(W, "TRACE", "Model", "get first job: 8c004305-c0a6-420f-9776-2760907ad795")
FLUSHED = ts_line(W, "DEBUG", "WorkerThread", "Flushing req.cmd PREDICT repeats 1 to backend at: 1796224928215")
ANSWERED = ts_line(W, "INFO", "WorkerThread", "Backend response time: 72")


@pytest.mark.parametrize("text, expected", [
    (TAKEN, (W, True)), (FLUSHED, (W, True)), (ANSWERED, (W, False)),
    (ts_line(W, "WARN", "WorkerThread", "Backend worker thread exception."), (W, False)),
    (ts_line(W, "DEBUG", "WorkerThread", f"{W} State change WORKER_MODEL_LOADED -> WORKER_STOPPED"), (W, False)),
    (ts_line(f"{W}-stdout", "INFO", "WorkerLifeCycle", "result=[METRICS]HandlerTime.Milliseconds:72.22"), None),
    (ts_line("epollEventLoopGroup-5-1", "INFO", "WorkerThread", "9000 Worker disconnected. WORKER_MODEL_LOADED"),
     None),
    ("java.lang.NullPointerException: Cannot invoke ...\n", None),
])
def test_which_ts_log_lines_make_a_worker_busy_or_idle(text, expected):
    assert worker_event(text) == expected


def test_worker_activity_follows_each_worker_incrementally(tmp_path):
    log = tmp_path / "ts_log.log"
    other = "W-9001-shapes_1.0"
    log.write_text("from an earlier server\n" + TAKEN)
    offset = len("from an earlier server\n")
    activity = WorkerActivity(log, offset)
    assert activity.read() == [W]
    with open(log, "a") as f:  # each org.pytorch.serve line comes twice; a line may be half written
        f.write(FLUSHED * 2 + ts_line(other, "TRACE", "Model", "get first job: x") + ANSWERED[:20])
    assert activity.read() == [W, other]
    with open(log, "a") as f:
        f.write(ANSWERED[20:] + ANSWERED)
    assert activity.read() == [other] and activity.events == 6
    assert WorkerActivity(tmp_path / "missing.log").read() == []


class Metrics:
    """A stand-in for TorchServe's /metrics: ``ts_inference_requests_total`` per model from ``arrivals``."""

    def __init__(self):
        self.arrivals: dict[str, int] = {}
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = "".join(f'ts_inference_requests_total{{model_name="{m}",model_version="default",'
                               f'hostname="vm",}} {float(n)}\n' for m, n in metrics.arrivals.items())
                body = "# TYPE ts_inference_requests_total counter\n" + body
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metrics():
    m = Metrics()
    yield m
    m.close()


def test_drain_after_v2_and_grpc_answers_finds_nothing_outstanding(metrics, tmp_path):
    log = tmp_path / "access_log.log"
    metrics.arrivals = {"shapes": 2}
    log.write_text(line("W-9000-shapes_1.0", "POST", "/v2/models/shapes/infer", 200)
                   + grpc_line("W-9000-shapes_1.0", f"{GRPC}/Predictions", 0))
    result = drain(metrics.url, log, timeout=5)
    assert result["drained"] and result["in_flight"] == 0, result


def test_drain_waits_for_a_grpc_answer_and_ignores_refusals(metrics, tmp_path):
    log = tmp_path / "access_log.log"
    metrics.arrivals = {"shapes": 3, "slow": 1}
    log.write_text(line("W-9000-shapes_1.0", "POST", "/predictions/shapes", 200) * 3
                   + line("epollEventLoopGroup-3-1", "POST", "/predictions/slow", 400) * 5     # refused: no key
                   + grpc_line("grpc-default-executor-0", f"{GRPC}/Predictions", 13) * 5       # refused: no model
                   + grpc_line("W-9000-shapes_1.0", f"{OIP}/ModelInfer", 0))                  # never counted

    def answer_later():
        time.sleep(0.6)
        with open(log, "a") as f:
            f.write(grpc_line("W-9001-slow_1.0", f"{GRPC}/Predictions", 0))
    t = threading.Thread(target=answer_later)
    t.start()
    result = drain(metrics.url, log, timeout=10)
    t.join()
    assert result["drained"] and result["in_flight"] == 1 and result["seconds"] >= 0.5, result


def test_drain_gives_up_when_a_grpc_request_stays_unanswered(metrics, tmp_path):
    log = tmp_path / "access_log.log"
    metrics.arrivals = {"m": 1}
    log.write_text(grpc_line("grpc-default-executor-1", f"{GRPC}/Predictions", 13))
    result = drain(metrics.url, log, timeout=0.3)
    assert not result["drained"] and result["in_flight"] == 1 and "1 of 1" in result["reason"], result


def test_drain_counts_grpc_answers_of_a_log_without_thread_names(metrics, tmp_path):
    log = tmp_path / "access_log.log"
    metrics.arrivals = {"a": 2}
    log.write_text(line(None, "POST", "/predictions/a", 200) + grpc_line(None, f"{GRPC}/Predictions", 0))
    assert drain(metrics.url, log, timeout=5)["drained"]


def test_make_stop_after_a_grpc_request_says_drained(metrics, tmp_path):
    """``python -m scripts.ts_server stop`` (make stop) on a state file: drained, then SIGTERM to the PID."""
    log = tmp_path / "access_log.log"
    log.write_text("before this server started\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write(line("W-9000-shapes_1.0", "POST", "/v2/models/shapes/infer", 200)
                + grpc_line("W-9000-shapes_1.0", f"{GRPC}/Predictions", 0))
    metrics.arrivals = {"shapes": 2}
    # stands in for TorchServe: `stop` signals only a PID whose command line is TorchServe's
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "org.pytorch.serve.ModelServer"])
    try:
        state = tmp_path / "server.json"
        state.write_text(json.dumps({"pid": sleeper.pid, "metrics_url": metrics.url, "access_log": str(log),
                                     "access_log_offset": offset}))
        cli = subprocess.run([sys.executable, "-m", "scripts.ts_server", "stop", "--state-file", str(state),
                              "--drain-timeout", "10"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "drained: 0 requests in flight answered" in cli.stdout, cli.stdout
        assert f"sent SIGTERM to TorchServe PID {sleeper.pid}" in cli.stdout
        assert f"TorchServe PID {sleeper.pid} exited" in cli.stdout  # returned once it was gone: ports free
        assert sleeper.poll() is not None and sleeper.returncode != 0 and not state.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("content", ['{"pid": 12', "", "[1, 2]", '{"pid": "x"}'])
def test_an_unreadable_state_file_is_stale_not_a_traceback(tmp_path, content):
    """A half-written or hand-edited .torchserve/server.json made `make stop` (and `make serve`) fail with a
    JSONDecodeError traceback until someone deleted it."""
    state = tmp_path / "server.json"
    state.write_text(content)
    cli = subprocess.run([sys.executable, "-m", "scripts.ts_server", "stop", "--state-file", str(state)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
    assert "nothing to stop" in cli.stdout and not state.exists()


def test_make_stop_never_signals_a_pid_that_is_no_longer_torchserve(tmp_path):
    """A state file outliving its server (kill -9, a closed terminal, a reboot): its PID may belong to any
    process now. ``stop`` leaves that process alone and removes the stale file."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "server.json"
        state.write_text(json.dumps({"pid": other.pid, "metrics_url": "http://127.0.0.1:9", "access_log": "x"}))
        cli = subprocess.run([sys.executable, "-m", "scripts.ts_server", "stop", "--state-file", str(state)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and f"TorchServe PID {other.pid} is not running" in cli.stdout, cli
        assert other.poll() is None and not state.exists()  # still alive, not signalled
    finally:
        other.kill()
        other.wait()


def test_drain_waits_for_a_busy_worker_that_no_counter_shows(metrics, tmp_path):
    """A gRPC ModelInfer in flight: TorchServe counts no arrival, but its worker took the job."""
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    metrics.arrivals = {"slow": 1}
    log.write_text(line(W, "POST", "/predictions/slow", 200))
    ts_log.write_text(TAKEN + ANSWERED + TAKEN + FLUSHED)

    def answer_later():
        time.sleep(0.6)
        with open(ts_log, "a") as f:
            f.write(ANSWERED)
        with open(log, "a") as f:
            f.write(grpc_line(W, f"{OIP}/ModelInfer", 0))
    t = threading.Thread(target=answer_later)
    t.start()
    result = drain(metrics.url, log, ts_log=ts_log, timeout=10)
    t.join()
    assert result["drained"] and result["in_flight"] == 0 and result["busy_workers"] == [W], result
    assert result["seconds"] >= 0.6 + 0.25, result  # answered, then quiet for `settle`
    # without the workers' log the drain sees nothing in flight and ends at once: the gap this closes
    assert drain(metrics.url, log, timeout=10)["seconds"] < 0.5


def test_drain_restarts_its_quiet_window_when_a_batch_comes_and_goes(metrics, tmp_path):
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    metrics.arrivals = {}
    ts_log.write_text(TAKEN + ANSWERED)

    def short_batch():
        time.sleep(0.15)
        with open(ts_log, "a") as f:  # taken and answered between two polls
            f.write(TAKEN + FLUSHED + ANSWERED)
    t = threading.Thread(target=short_batch)
    t.start()
    result = drain(metrics.url, log, ts_log=ts_log, timeout=10, settle=0.3)
    t.join()
    assert result["drained"] and result["busy_workers"] == [] and result["seconds"] >= 0.15 + 0.3, result


def test_drain_gives_up_on_a_worker_that_stays_busy_and_names_it(metrics, tmp_path):
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    metrics.arrivals = {}
    ts_log.write_text(TAKEN)
    result = drain(metrics.url, log, ts_log=ts_log, timeout=0.3)
    assert not result["drained"] and W in result["reason"] and "ModelInfer" in result["reason"], result


def test_make_stop_does_not_import_torch():
    """``make stop`` signals within the drain's timing: importing torch first (seconds on a slow CI host) let a
    slow model's batch window close before the SIGTERM, so the requests "in flight" were already answered."""
    probe = "import sys, scripts.ts_server; print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_drain_counts_answers_across_an_access_log_rollover(metrics, tmp_path):
    """log4j2 renamed the access log (daily, or at 100 MB) after some answers: they still count."""
    log = tmp_path / "access_log.log"
    log.write_text(line(None, "GET", "/ping", 200))
    offset, ino = log.stat().st_size, log.stat().st_ino
    metrics.arrivals = {"shapes": 3}
    with open(log, "a") as f:
        f.write(line("W-9000-shapes_1.0", "POST", "/predictions/shapes", 200) * 2)
    log.rename(tmp_path / "access_log.2026-12-06.1.log")
    log.write_text(line("W-9000-shapes_1.0", "POST", "/predictions/shapes", 200))
    result = drain(metrics.url, log, offset=offset, inode=ino, timeout=5)
    assert result["drained"] and result["in_flight"] == 0, result
    assert not drain(metrics.url, log, offset=offset, timeout=0.3)["drained"]  # the file alone: 1 answer of 3


def test_drain_with_answers_lost_to_a_compressed_rollover_waits_for_idle_workers(metrics, tmp_path):
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    log.write_text(line("W-9000-shapes_1.0", "POST", "/predictions/shapes", 200))
    ino = log.stat().st_ino
    metrics.arrivals = {"shapes": 5}
    new = tmp_path / "new.tmp"  # made before the old file goes: it cannot take the old one's inode number
    new.write_text(line("W-9000-shapes_1.0", "POST", "/predictions/shapes", 200))
    os.replace(new, log)  # the old file gzipped away by TorchServe's own log4j2.xml: its answers cannot be read
    ts_log.write_text(ANSWERED)
    result = drain(metrics.url, log, inode=ino, ts_log=ts_log, timeout=5, settle=0.1)
    assert result["drained"] and result["in_flight"] is None, result
    result = drain(metrics.url, log, inode=ino, timeout=0.3)  # and no ts_log to tell: not drained, and why
    assert not result["drained"] and "rolled over into a file that could not be read" in result["reason"], result


def test_a_cancelled_grpc_call_does_not_hold_every_later_drain(metrics, tmp_path):
    """A gRPC client's deadline passed: TorchServe counted the call, closed it CANCELLED on a gRPC thread and
    never logs its job's answer. The gap it left stayed for the server's life: every later `make stop`
    waited its whole timeout and said "not drained"."""
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    metrics.arrivals = {"shapes": 3}
    log.write_text(line("W-9000-shapes_1.0", "POST", "/predictions/shapes", 200)
                   + grpc_line("W-9000-shapes_1.0", f"{GRPC}/Predictions", 0)
                   + grpc_line("grpc-default-executor-1", f"{GRPC}/Predictions", 1))
    ts_log.write_text(ts_line(W, "TRACE", "Model", "get first job: x") + ANSWERED)
    result = drain(metrics.url, log, ts_log=ts_log, timeout=5)
    assert result["drained"] and result["in_flight"] == 0 and result["seconds"] < 1, result


def state_line(worker: str, old: str, new: str, thread: str | None = None) -> str:
    """WorkerThread.setState's DEBUG line (logged on the worker's thread, or on the thread that scales it down)."""
    return ts_line(thread or worker, "DEBUG", "WorkerThread", f"{worker} State change {old} -> {new}")


STARTED = (ts_line(W, "DEBUG", "WorkerLifeCycle", "Worker cmdline: [python, ts/model_service_worker.py]")
           + state_line(W, "null", "WORKER_STARTED") + state_line(W, "WORKER_STARTED", "WORKER_MODEL_LOADED"))


def test_arrivals_that_are_never_answered_end_the_drain_once_every_worker_stays_idle(metrics, tmp_path):
    """A StreamPredictions2 stream (every message counted, one line per stream, written on a gRPC thread) or a
    gRPC call refused by a full queue: no line will ever answer them. With the workers' log: ended once
    every worker has been idle for `stale` seconds, and said; without it, or while a worker is starting or
    down (its model's jobs wait for it), the drain waits for its timeout."""
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    metrics.arrivals = {"slow": 3}
    log.write_text(line(W, "POST", "/predictions/slow", 200)
                   + grpc_line("grpc-default-executor-3", f"{GRPC}/StreamPredictions2", 0)
                   + grpc_line("grpc-default-executor-4", f"{GRPC}/StreamPredictions2", 1))  # cancelled stream
    ts_log.write_text(STARTED + TAKEN + ANSWERED)
    result = drain(metrics.url, log, ts_log=ts_log, timeout=10, stale=0.5)
    assert result["drained"] and result["in_flight"] == 2 and 0.5 <= result["seconds"] < 3, result
    assert result["reason"].startswith("2 counted arrivals have no logged answer"), result
    assert not drain(metrics.url, log, timeout=0.8, stale=0.5)["drained"]  # no ts_log: cannot tell
    with open(ts_log, "a") as f:  # the worker died and waits for its restart: its queued jobs with it
        f.write(state_line(W, "WORKER_MODEL_LOADED", "WORKER_STOPPED"))
    result = drain(metrics.url, log, ts_log=ts_log, timeout=1.2, stale=0.5)
    assert not result["drained"] and "2 of 2 requests still unanswered" in result["reason"], result
    with open(ts_log, "a") as f:  # restarted: starting (its process not up yet) is not idle either
        f.write(ts_line(W, "DEBUG", "WorkerLifeCycle", "Worker cmdline: [python, ts/model_service_worker.py]"))
    assert not drain(metrics.url, log, ts_log=ts_log, timeout=1.2, stale=0.5)["drained"]
    with open(ts_log, "a") as f:
        f.write(state_line(W, "null", "WORKER_STARTED") + state_line(W, "WORKER_STARTED", "WORKER_MODEL_LOADED"))
    assert drain(metrics.url, log, ts_log=ts_log, timeout=5, stale=0.5)["drained"]


def test_a_scaled_down_worker_is_gone_not_down(metrics, tmp_path):
    """Scaling down (PUT min_worker, an unregister) logs SCALED_DOWN from the management thread, then the
    worker's own thread logs WORKER_STOPPED as it ends: no restart comes, so it does not hold the drain."""
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    other = "W-9001-slow_1.0"
    metrics.arrivals = {"slow": 2}
    log.write_text(line(W, "POST", "/predictions/slow", 200))
    ts_log.write_text(STARTED + STARTED.replace(W, other) + TAKEN + ANSWERED
                      + state_line(other, "WORKER_MODEL_LOADED", "WORKER_SCALED_DOWN", thread="epollEventLoopGroup-3-2")
                      + state_line(other, "WORKER_SCALED_DOWN", "WORKER_STOPPED"))
    result = drain(metrics.url, log, ts_log=ts_log, timeout=5, stale=0.5)
    assert result["drained"] and result["in_flight"] == 1, result


def test_without_the_workers_states_in_the_log_unanswered_arrivals_hold_the_drain(metrics, tmp_path):
    """A log4j2.xml at INFO (deploy/'s) writes no batch or state lines: idle-looking workers may be mid-batch,
    so only the counts decide."""
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    metrics.arrivals = {"slow": 2}
    log.write_text(line(W, "POST", "/predictions/slow", 200))
    ts_log.write_text(ANSWERED)
    result = drain(metrics.url, log, ts_log=ts_log, timeout=1.0, stale=0.3)
    assert not result["drained"] and "1 of 1 requests still unanswered" in result["reason"], result


def test_a_line_flushed_while_the_first_read_ran_restarts_the_quiet_window(metrics, tmp_path, monkeypatch):
    """The first reads of a long-running server's logs can take longer than `settle`: the quiet window
    starts after them, so a batch line written meanwhile is read before the drain ends."""
    log, ts_log = tmp_path / "access_log.log", tmp_path / "ts_log.log"
    metrics.arrivals = {}
    ts_log.write_text(ANSWERED)
    real = WorkerActivity.read
    calls = []

    def slow_first_read(self):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.4)
            busy = real(self)
            with open(ts_log, "a") as f:  # an uncounted ModelInfer's batch, flushed just after the read
                f.write(TAKEN)
            return busy
        return real(self)
    monkeypatch.setattr(WorkerActivity, "read", slow_first_read)
    result = drain(metrics.url, log, ts_log=ts_log, timeout=0.8, settle=0.25)
    assert not result["drained"] and W in result["reason"], result
