"""deploy/image/ts_ready.py, the readiness probe of the Kubernetes Deployment, against a real TorchServe.

TorchServe 0.12's ``/ping`` answers 200 while a model is still loading and while a model fails to load;
the probe must say "not ready" then, and "ready" once every model has a READY worker. Run with the locked-
down profile (token authorization on), so the management key path is exercised too.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from export.archive import run_archiver
from tools import REPO
from tools.client import call
from tools.torchserve import TorchServe

pytestmark = pytest.mark.slow

PROBE = REPO / "deploy" / "image" / "ts_ready.py"
LOAD_SECONDS = 12  # how long the slow model's initialize takes

HANDLER = '''
import time


class Handler:
    def initialize(self, context):
        if context.manifest["model"]["modelName"] == "broken":
            raise RuntimeError("this model never loads")
        time.sleep({seconds})
        self.initialized = True

    def handle(self, data, context):
        return ["ok"] * len(data)
'''


def _archive(store, name: str, handler) -> None:
    run_archiver(["--model-name", name, "--version", "1.0", "--handler", str(handler), "--export-path", str(store)],
                 timeout=120).check_returncode()


def _probe(ts: TorchServe, *, key: bool = True) -> tuple[int, str]:
    args = ["--url", ts.management_url, *(["--key-file", str(ts.key_file)] if key else [])]
    proc = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=30)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def test_the_probe_waits_for_the_models_where_ping_does_not(tmp_path):
    handler = tmp_path / "slow_handler.py"
    handler.write_text(HANDLER.replace("{seconds}", str(LOAD_SECONDS)))
    store = tmp_path / "store"
    store.mkdir()
    _archive(store, "slow", handler)
    _archive(store, "broken", handler)
    ts = TorchServe(model_store=store, models="slow=slow.mar", config=REPO / "config.prod.properties",
                    overrides={"enable_model_api": "true"})
    ts.start(wait=False)
    try:
        ping_healthy_while_loading = None
        deadline = time.time() + 60
        while time.time() < deadline:  # the frontend is up: /ping answers while the model still loads
            try:
                status, body = call(f"{ts.url}/ping", headers=ts.auth("inference"), timeout=2)
            except OSError:
                time.sleep(0.2)
                continue
            code, said = _probe(ts)
            ping_healthy_while_loading = status == 200 and code == 1
            break
        print(f"\n/ping while the model loads: {status} {' '.join(body.split())}; probe: {code} {said}")
        assert ping_healthy_while_loading, (status, body, code, said)  # the reason for the probe
        assert "model slow has no READY worker" in said

        start = time.time()
        while (code := _probe(ts)[0]) != 0 and time.time() - start < 120:
            time.sleep(1)
        code, said = _probe(ts)
        print(f"probe ready {time.time() - start:.1f} s after it first said not ready: {said}")
        assert code == 0 and said == "ready"
        assert call(f"{ts.url}/predictions/slow", method="POST", data=b"x", headers=ts.auth("inference"),
                    timeout=30)[0] == 200
        code, said = _probe(ts, key=False)  # token authorization on: refused without the management key
        assert code == 1 and "did not answer as TorchServe's: HTTPError" in said

        # a model that fails to load, registered beside the good one: never ready, whatever /ping says
        status, body = ts.manage("POST", "/models?url=broken.mar&initial_workers=1&synchronous=false")
        assert status == 202, body
        time.sleep(8)  # a few failed starts
        ping = call(f"{ts.url}/ping", headers=ts.auth("inference"), timeout=5)
        code, said = _probe(ts)
        print(f"/ping with a model that fails to load: {ping[0]} {' '.join(ping[1].split())}; probe: {code} {said}")
        assert code == 1 and "model broken has no READY worker" in said
        ts.manage("DELETE", "/models/broken")
        assert _probe(ts)[0] == 0
        assert json.loads(call(f"{ts.url}/ping", headers=ts.auth("inference"), timeout=5)[1])["status"] == "Healthy"
    finally:
        ts.close()


def test_the_probe_ignores_proxy_variables_and_ends_within_its_deadline(tmp_path):
    """A cluster that injects HTTP_PROXY into every pod sent the loopback probe through the proxy (never ready);
    and one slow answer per model added up past the probe's timeoutSeconds (the kubelet kills it: a failure
    without a reason). A stand-in management API: one model, READY, and a slow path."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Api(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/models?"):
                body = {"models": [{"modelName": "m"}, {"modelName": "slow"}]}
            else:
                if self.path == "/models/slow":
                    time.sleep(1.5)  # within the 2 s per request, beyond a 1 s deadline
                body = [{"workers": [{"status": "READY"}]}]
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {"PATH": "/usr/bin:/bin", "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    try:
        proc = subprocess.run([sys.executable, str(PROBE), "--url", url, "--deadline", "10"], capture_output=True,
                              text=True, timeout=30, env=env)
        assert proc.returncode == 0 and proc.stdout.strip() == "ready", proc.stderr
        began = time.monotonic()
        proc = subprocess.run([sys.executable, str(PROBE), "--url", url, "--deadline", "1"], capture_output=True,
                              text=True, timeout=30, env=env)
        took = time.monotonic() - began
        assert proc.returncode == 1 and "not ready" in proc.stderr and took < 2.5, (took, proc.stderr)
    finally:
        server.shutdown()
        server.server_close()
