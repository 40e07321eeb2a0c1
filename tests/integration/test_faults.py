"""Faults against a real TorchServe (Java frontend + Python worker) on loopback, real image bytes.

* A worker killed with SIGKILL under load: TorchServe starts a new one, the batch that was inside the
  dead worker fails fast with a 5xx, nothing hangs past the response timeout, and the model answers
  normally again within 30 s.
* Broken archives (garbage bytes, an archive without ``index_to_name.json``): registration fails with
  an error status and the log names the problem, while the model already registered keeps answering.
* Stopping with requests in flight: TorchServe alone (SIGTERM, which is all ``torchserve --stop``
  does) cuts them; ``python -m scripts.ts_server stop`` (``make stop``) drains them first.
* Stopped during start-up, before the launcher has written Java's PID: Java and its workers still end.
* An answer longer than the frontend's ``max_response_size``: TorchServe alone drops the worker and fails
  its whole batch; the handler's ``max_response_bytes`` makes it that request's 413.

Run with ``-s`` to see the measured numbers (docs/reliability.md records them).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import psutil
import pytest

from export.archive import build_archive
from tests.conftest import encode, pattern_image
from tools import REPO
from tools.client import predict
from tools.drain import inference_arrivals
from tools.processes import worker_processes
from tools.torchserve import TorchServe

pytestmark = pytest.mark.slow

RESPONSE_TIMEOUT_S = 15   # the archive's responseTimeout
MARGIN_S = 5              # what a request may take beyond it before it counts as hung
RECOVERY_LIMIT_S = 30


def _payloads() -> list[tuple[bytes, str]]:
    return [(encode(pattern_image("circle", size=30, seed=1)), "image/png"),
            (encode(pattern_image("vertical", size=64, seed=2), "JPEG", quality=90), "image/jpeg"),
            (encode(pattern_image("horizontal", size=48, seed=3)), "image/png"),
            (encode(pattern_image("circle", size=96, seed=4), "JPEG", quality=80), "image/jpeg")]


class LoadLoop:
    """Closed-loop clients on threads; every request is recorded as (start, end, status, detail).

    Status -1 means no HTTP answer at all (connection reset, client timeout). Bounded: each request
    times out on the client after ``client_timeout`` and the loop ends after ``max_seconds``."""

    def __init__(self, url: str, model: str, *, threads: int, client_timeout: float, max_seconds: float = 60):
        self.url, self.model, self.client_timeout = url, model, client_timeout
        self.results: list[tuple[float, float, int, str]] = []
        self._stop = threading.Event()
        self._deadline = time.time() + max_seconds
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        payloads = _payloads()
        k = i
        while not self._stop.is_set() and time.time() < self._deadline:
            data, ctype = payloads[k % len(payloads)]
            k += 1
            t0 = time.time()
            try:
                status, body = predict(self.url, self.model, data, content_type=ctype, timeout=self.client_timeout)
                detail = (body.get("message") or body.get("error") or "") if isinstance(body, dict) else ""
            except (OSError, ValueError) as e:
                status, detail = -1, repr(e)
            self.results.append((t0, time.time(), status, str(detail)[:200]))

    def start(self) -> "LoadLoop":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.client_timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread did not finish"

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
            time.sleep(0.05)


def _workers(server: TorchServe, model: str) -> list[dict]:
    status, body = server.manage("GET", f"/models/{model}", timeout=10)
    assert status == 200, body
    return [w for m in body for w in m["workers"]]


@pytest.fixture(scope="class")
def fault_server(export_dir, tmp_path_factory):
    """One model, one worker, batches of 4, a modest response timeout; the management API is on."""
    store = tmp_path_factory.mktemp("fault_store")
    build_archive(export_dir, variant="onnx", name="shapes", model_store=store, batch_size=4, max_batch_delay=20,
                  workers=1, response_timeout=RESPONSE_TIMEOUT_S, topk=2, tta="none")
    server = TorchServe(model_store=store, models="shapes=shapes.mar", overrides={"enable_model_api": "true"})
    server.start(timeout=180)
    pid = server.pid
    yield server
    server.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


class TestWorkerAndArchiveFaults:
    def test_killed_worker_is_replaced_and_requests_fail_fast(self, fault_server):
        server = fault_server
        (old,) = _workers(server, "shapes")
        assert old["status"] == "READY"
        assert old["pid"] in [p.pid for p in worker_processes(server.pid)]  # the API names the real process
        load = LoadLoop(server.url, "shapes", threads=12, client_timeout=RESPONSE_TIMEOUT_S + 30).start()
        try:
            load.wait_for(lambda: sum(r[2] == 200 for r in load.results) >= 40, 60, "40 answers before the kill")
            killed_at = time.time()
            os.kill(old["pid"], signal.SIGKILL)
            new_worker_s = None
            deadline = killed_at + RECOVERY_LIMIT_S
            while time.time() < deadline:
                ws = _workers(server, "shapes")
                if ws and ws[0]["pid"] != old["pid"] and ws[0]["status"] == "READY":
                    new_worker_s = time.time() - killed_at
                    new_pid = ws[0]["pid"]
                    break
                time.sleep(0.1)
            assert new_worker_s is not None, f"no new READY worker {RECOVERY_LIMIT_S} s after the kill"
            load.wait_for(lambda: any(r[0] > killed_at and r[2] == 200 for r in load.results), RECOVERY_LIMIT_S,
                          "a 200 to a request sent after the kill")
            answered = len(load.results)
            load.wait_for(lambda: len(load.results) >= answered + 40, 30, "40 more answers after recovery")
        finally:
            load.stop()
        results = load.results
        recovery_s = min(r[1] for r in results if r[0] > killed_at and r[2] == 200) - killed_at
        in_flight = [r for r in results if r[0] <= killed_at < r[1]]
        failed = [r for r in results if r[2] != 200]
        max_latency = max(r[1] - r[0] for r in results)
        print(f"\nFAULT worker SIGKILL under load (12 clients, batch 4, responseTimeout {RESPONSE_TIMEOUT_S} s): "
              f"requests={len(results)} in_flight_at_kill={len(in_flight)} failed={len(failed)} "
              f"statuses={sorted({r[2] for r in failed})} messages={sorted({r[3] for r in failed})} "
              f"failed_within_s={max((r[1] - killed_at for r in failed), default=0):.3f} "
              f"max_latency_s={max_latency:.2f} new_worker_s={new_worker_s:.2f} recovery_s={recovery_s:.2f}")
        assert new_pid != old["pid"] and not psutil.pid_exists(old["pid"])
        assert in_flight, "no request was in flight at the kill"
        assert failed, "the kill cost no request: the worker held no batch"
        assert all(500 <= r[2] < 600 for r in failed), f"failures must be 5xx answers: {failed[:5]}"
        assert all(r[0] <= killed_at < r[1] for r in failed), "only requests in flight at the kill may fail"
        assert all(r[1] - killed_at < 5 for r in failed), "the failed requests did not fail fast"
        assert max_latency < RESPONSE_TIMEOUT_S + MARGIN_S, f"a request took {max_latency:.1f} s"
        assert recovery_s < RECOVERY_LIMIT_S
        assert [p.pid for p in worker_processes(server.pid)] == [new_pid]

    def test_broken_archives_are_refused_while_the_served_model_keeps_answering(self, fault_server, export_dir,
                                                                                 tmp_path):
        server = fault_server
        store = server.model_store
        (store / "x.mar").write_bytes(os.urandom(4096))  # garbage named like an archive
        good = build_archive(export_dir, variant="onnx", name="noindex", model_store=tmp_path, topk=2, tta="none")
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(store / "noindex.mar", "w", zipfile.ZIP_DEFLATED) as dst:
            assert "index_to_name.json" in src.namelist()
            for item in src.infolist():
                if item.filename != "index_to_name.json":
                    dst.writestr(item, src.read(item))
        model_log = server.log_dir / "model_log.log"
        log_start = model_log.stat().st_size if model_log.is_file() else 0
        load = LoadLoop(server.url, "shapes", threads=2, client_timeout=RESPONSE_TIMEOUT_S + 30).start()
        try:
            start = time.time()
            garbage = server.manage("POST", "/models?url=x.mar&initial_workers=1&synchronous=true")
            garbage_s = time.time() - start
            start = time.time()
            garbage_named = server.manage("POST", "/models?url=x.mar&model_name=x&initial_workers=1&synchronous=true")
            garbage_named_s = time.time() - start
            start = time.time()
            noindex = server.manage("POST", "/models?url=noindex.mar&initial_workers=1&synchronous=true")
            noindex_s = time.time() - start
            answered = len(load.results)
            load.wait_for(lambda: len(load.results) >= answered + 10, 30, "10 more answers after the registrations")
        finally:
            load.stop()
        log = model_log.read_text(errors="replace")[log_start:]
        problem = [ln for ln in log.splitlines() if "index_to_name.json" in ln
                   and any(w in ln for w in ("No such file", "missing", "not found", "FileNotFoundError"))]
        print(f"\nFAULT broken archives: garbage x.mar -> {garbage[0]} {garbage[1]} in {garbage_s:.2f} s; "
              f"garbage with model_name -> {garbage_named[0]} {garbage_named[1]} in {garbage_named_s:.2f} s; "
              f"no index_to_name.json -> {noindex[0]} {noindex[1]} in {noindex_s:.2f} s; log: "
              f"{problem[0].split(' - ', 1)[-1] if problem else None}; served model during: "
              f"{len(load.results)} requests, statuses {sorted({r[2] for r in load.results})}")
        assert garbage[0] == 400 and garbage[1]["type"] == "InvalidModelException", garbage
        assert garbage_named[0] == 500 and "Failed to start workers" in garbage_named[1]["message"], garbage_named
        assert noindex[0] == 500 and "noindex" in noindex[1]["message"], noindex
        assert problem, "model_log.log does not say that index_to_name.json is missing"
        status, models = server.manage("GET", "/models")
        assert [m["modelName"] for m in models["models"]] == ["shapes"]  # nothing half-registered is left
        load.wait_for(lambda: len(worker_processes(server.pid)) == 1, 30, "the failed workers to exit")
        assert load.results and all(r[2] == 200 for r in load.results), \
            [r for r in load.results if r[2] != 200][:5]


# --- stopping with requests in flight ----------------------------------------------------------------

# The batch waits this long for company: requests sit in flight that long. 3 s once let the control's batch run
# before the stop command's SIGTERM reached TorchServe (a slower host, 2026-12-05): 6 s leaves it no chance.
SLOW_DELAY_MS = 6000


@pytest.fixture(scope="module")
def slow_store(export_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("slow_store")
    build_archive(export_dir, variant="onnx", name="slow", model_store=store, batch_size=8,
                  max_batch_delay=SLOW_DELAY_MS, workers=1, response_timeout=20, topk=2, tta="none")
    return store


def _stop_with_requests_in_flight(store, tmp_path, drain_timeout: float, n: int = 3):
    """Start a server, put ``n`` requests in flight, stop it as ``make stop`` does; return what happened."""
    server = TorchServe(model_store=store, models="slow=slow.mar")
    server.start(timeout=180)
    pid = server.pid
    results: list[tuple[float, float, int, str]] = []
    image = encode(pattern_image("vertical", size=40, seed=5))

    def one():
        t0 = time.time()
        try:
            status, body = predict(server.url, "slow", image, timeout=60)
            detail = json.dumps(body)
        except OSError as e:
            status, detail = -1, repr(e)
        results.append((t0, time.time(), status, detail))
    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while (inference_arrivals(server.metrics_url) or {}).get("slow", 0) < n:  # all n are in
            assert time.time() < deadline, "the requests never reached TorchServe"
            time.sleep(0.02)
        state_file = tmp_path / "server.json"
        state_file.write_text(json.dumps(server.state()))
        stop_at = time.time()
        cli = subprocess.run([sys.executable, "-m", "scripts.ts_server", "stop", "--state-file", str(state_file),
                              "--drain-timeout", str(drain_timeout)], cwd=REPO, capture_output=True, text=True,
                             timeout=drain_timeout + 30)
        for t in threads:
            t.join(timeout=70)
        server.launcher.wait(timeout=60)
        exited_s = time.time() - stop_at
    finally:
        server.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return results, cli, stop_at, exited_s


def test_torchserve_alone_cuts_requests_in_flight(slow_store, tmp_path):
    """The control: SIGTERM without a drain (``--drain-timeout 0``: what ``torchserve --stop`` does)."""
    results, cli, stop_at, exited_s = _stop_with_requests_in_flight(slow_store, tmp_path, drain_timeout=0)
    print(f"\nSTOP without drain: {[(r[2], r[3][:60], round(r[1] - stop_at, 3)) for r in results]}; "
          f"Java exited {exited_s:.2f} s after the stop command")
    assert cli.returncode == 0 and "SIGTERM" in cli.stdout, cli.stdout + cli.stderr
    assert len(results) == 3
    assert all(r[2] == -1 for r in results), f"TorchServe answered requests in flight on SIGTERM: {results}"
    assert all(r[1] - stop_at < SLOW_DELAY_MS / 1000 for r in results)  # cut before their batch could run


def test_stop_drains_requests_in_flight(slow_store, tmp_path):
    results, cli, stop_at, exited_s = _stop_with_requests_in_flight(slow_store, tmp_path, drain_timeout=30)
    print(f"\nSTOP with drain: {cli.stdout.strip()!r}; answers {[r[2] for r in results]} "
          f"{max(r[1] for r in results) - stop_at:.2f} s after the stop command; Java exited {exited_s:.2f} s after it")
    assert cli.returncode == 0 and "drained: 3 requests in flight answered" in cli.stdout, cli.stdout + cli.stderr
    assert len(results) == 3 and all(r[2] == 200 for r in results), results
    assert all(json.loads(r[3])["predictions"] for r in results)



class _Interrupted(Exception):
    """Stands for the SIGTERM or Ctrl-C that `make serve` turns into an exception in its main thread."""


def test_a_stop_before_java_has_a_pid_still_stops_java(tmp_path, monkeypatch):
    """An interruption in the first second of start-up, before the launcher had written Java's PID: the stop
    waited 20 s for the launcher, killed it, and left Java and its workers running (CI: `make stop` during
    `make serve`'s start-up left three TorchServe processes). The stop now waits for the PID and ends Java."""
    workdir = tmp_path / "run"
    server = TorchServe(model_store=tmp_path, workdir=workdir)
    read_pid = TorchServe._java_pid

    def interrupted(self, *, timeout):
        monkeypatch.setattr(TorchServe, "_java_pid", read_pid)  # the stop's own wait reads it for real
        assert not (workdir / ".model_server.pid").exists()  # before the launcher wrote it, as in the race
        raise _Interrupted

    monkeypatch.setattr(TorchServe, "_java_pid", interrupted)
    began = time.monotonic()
    try:
        with pytest.raises(_Interrupted):
            server.start()
        took = time.monotonic() - began
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(workdir) in " ".join(p.info["cmdline"] or [])]
        print(f"\nSTOP before the Java PID: {took:.1f} s, processes left {left}")
        assert not left, f"TorchServe processes left: {left}"
        assert server.launcher.returncode is not None and server.pid is None
        assert took < 20  # it stopped Java, not waited out the launcher
    finally:
        for process in psutil.process_iter(["cmdline"]):  # a failure here must not leave them to later tests
            if str(workdir) in " ".join(process.info["cmdline"] or []):
                process.kill()

# --- an answer over the frontend's max_response_size ------------------------------------------------------------

def test_an_answer_over_max_response_size_fails_only_its_request_with_the_handlers_limit(export_dir, tmp_path):
    """The control (``max_response_bytes`` above the frontend's limit): TorchServe 0.12 refuses the worker's
    answer, kills the worker and answers every request of the batch with an error; with the limit set to the
    frontend's, the long answer is its request's 413 and the neighbour in the same batch gets its 200."""
    store = tmp_path / "store"
    common = dict(model_store=store, batch_size=4, max_batch_delay=1000, workers=1, topk=3, tta="none")
    build_archive(export_dir, variant="onnx", name="unguarded", max_response_bytes=10**9, **common)
    build_archive(export_dir, variant="onnx", name="guarded", max_response_bytes=4096, **common)
    long = json.dumps({"data": [base64.b64encode(encode(pattern_image("circle", size=30, seed=s))).decode()
                                for s in range(24)], "topk": 3}).encode()  # 24 images x 3 classes: ~6 KB answer
    short = encode(pattern_image("vertical", size=30, seed=1))
    with TorchServe(model_store=store, models="unguarded=unguarded.mar,guarded=guarded.mar",
                    overrides={"max_response_size": "4096"}) as server:
        outcome = {}
        for model in ("unguarded", "guarded"):
            results: dict[str, tuple[int, str]] = {}

            def send(kind, body, ctype, model=model, results=results):
                try:
                    results[kind] = predict(server.url, model, body, content_type=ctype, timeout=60)
                except OSError as e:
                    results[kind] = (-1, repr(e))
            threads = [threading.Thread(target=send, args=("long", long, "application/json")),
                       threading.Thread(target=send, args=("short", short, "image/png"))]
            for t in threads:  # one batch: the 1 s window holds both
                t.start()
            for t in threads:
                t.join(timeout=90)
            outcome[model] = results
        print(f"\nANSWER over max_response_size: {({m: {k: v[0] for k, v in r.items()} for m, r in outcome.items()})}")
        unguarded = outcome["unguarded"]
        assert unguarded["long"][0] >= 500 and unguarded["short"][0] >= 500, unguarded  # the whole batch lost
        guarded = outcome["guarded"]
        assert guarded["long"][0] == 413 and guarded["long"][1]["error"] == "answer too large", guarded["long"]
        assert guarded["short"][0] == 200 and guarded["short"][1]["predictions"], guarded["short"]
