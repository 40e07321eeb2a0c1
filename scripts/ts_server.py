"""``make serve`` / ``make stop``: serve model_store/ with TorchServe in the foreground; drain and stop it by PID.

    python -m scripts.ts_server serve    # foreground, serves model_store/ with config.properties
    python -m scripts.ts_server serve --config config.prod.properties [--enable-model-api]
    python -m scripts.ts_server wait     # returns once that server is ready (make serve & ... in a script)
    python -m scripts.ts_server stop     # drains, then stops that server by its PID

``serve`` runs TorchServe in ``.torchserve/run/`` (its working and temporary directory: PID file,
worker sockets, the config it was given and, with token authorization on as in
config.prod.properties, TorchServe's ``key_file.json``: ``.torchserve/run/key_file.json``, mode 600,
removed when the server stops). It records the server's PID, addresses and access-log offset in
``.torchserve/server.json``; ``stop`` reads that file, waits (``--drain-timeout``, 30 s) until the
requests that had arrived are answered (TorchServe 0.12 itself cuts them on SIGTERM: see
``tools/drain.py``), then sends SIGTERM and returns once the process has exited (so ``make stop && make
serve`` finds the ports free). The state file is written (atomically) once the server is ready: waiting for
it is waiting for readiness; an unreadable one is stale. Until then ``serve`` keeps its own PID in
``.torchserve/server.starting.json``, so that ``stop`` (or SIGTERM) during start-up stops what was started,
and it holds ``.torchserve/server.lock`` for as long as it runs (:mod:`inference.folder_lock`): a second
``serve`` is refused in one line, however close behind the first it comes.
``wait`` returns once the state file names a live TorchServe (a state file left by a killed server or a crashed
host does not count), and fails with one line when no ``serve`` is starting one or ``--timeout`` passes.
``serve`` exits 1 when TorchServe exits without being asked (killed, crashed). The drain reads only ``/metrics`` and the access log, which
need no key. ``--enable-model-api`` turns on registration over the management API
(``enable_model_api=true``); what may be registered is the config's ``allowed_urls``. The process
lifecycle itself is ``tools.torchserve.TorchServe``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import urllib.parse
from pathlib import Path

import psutil

from inference.atomic import write_json
from inference.cli import UsageError
from inference.cli import run as run_cli
from inference.folder_lock import FolderBusy, folder_locked
from tools import REPO
from tools.client import LOOPBACK
from tools.drain import drain
from tools.torchserve import DEFAULT_CONFIG, TorchServe, is_torchserve, kill_trees, read_properties

STATE_FILE = REPO / ".torchserve" / "server.json"
RUN_DIR = REPO / ".torchserve" / "run"  # TorchServe's working directory: key_file.json lands here
WAIT_GRACE = 15.0  # seconds `wait` gives a `serve` launched beside it (`make serve &`) to write its starting file
LOCK_WAIT = 10.0  # seconds `serve` waits for the lock of a `serve` that is exiting (`make stop && make serve`)
EXIT_TIMEOUT = 60.0  # seconds `stop` waits for the Java process to exit after SIGTERM (it takes about 3), then SIGKILL


class Terminate(Exception):
    """SIGTERM to ``serve`` itself (``kill``, ``timeout``, a supervisor): raised in the main thread, which then
    drains and stops the server. Stopping inside the signal handler hung for good: the handler interrupted
    ``Popen.wait()``, which holds the lock that the stop's own ``wait()`` needs."""


def _terminate(*_) -> None:
    raise Terminate


def _starting_file(state_file: Path) -> Path:
    """Where ``serve`` leaves its own PID while TorchServe starts (the state file means "ready", and README's
    readiness loops wait for it), so that ``stop`` can stop a server that is still starting."""
    return state_file.with_name(f"{state_file.stem}.starting{state_file.suffix}")


def serve(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: file not found (config.properties, or config.prod.properties for "
                         "the locked-down profile)")
    if not any(Path(args.model_store).glob("*.mar")):
        raise UsageError(f"no .mar archives in {args.model_store}: run `make demo` (or `python -m export archive "
                         "...`) first")
    state_file = Path(getattr(args, "state_file", None) or STATE_FILE)
    _refuse_a_live_server(state_file)
    starting = _is_serve(_read_state(_starting_file(state_file)).get("serve_pid"))  # refused at once, as serving
    try:  # one `make serve` at a time; a few seconds for one that `make stop` has just stopped to exit
        with folder_locked(state_file.parent, name=f"{state_file.stem}.lock", wait=0 if starting else LOCK_WAIT):
            return _serve(args, state_file)
    except FolderBusy as e:
        raise UsageError(f"a `make serve` (PID {e.holder}) is starting TorchServe or serving with it: wait for it, "
                         "or `make stop`") from None


def _refuse_a_live_server(state_file: Path) -> None:
    if state_file.is_file():
        pid = _read_state(state_file).get("pid")
        if pid and is_torchserve(pid):
            raise UsageError(f"a TorchServe started by `make serve` already runs (PID {pid}): `make stop` first")


def _serve(args: argparse.Namespace, state_file: Path) -> int:
    _refuse_a_live_server(state_file)  # again, under the lock
    if state_file.is_file():
        state_file.unlink()  # stale: it must not say "ready" before this server is
    props = read_properties(args.config)
    found = {k: re.search(r":(\d+)/?$", props.get(k, "").strip())  # the last colon: [::1] has others
             for k in ("inference_address", "management_address", "metrics_address")}
    if not all(found.values()):
        raise UsageError(f"{args.config}: {', '.join(k for k, m in found.items() if not m)} must be http://HOST:PORT")
    ports = tuple(int(m.group(1)) for m in found.values())
    grpc = {k: props.get(k, default).strip() for k, default in (("grpc_inference_port", "7070"),
                                                                  ("grpc_management_port", "7071"))}
    if bad := [f"{k}={v!r}" for k, v in grpc.items() if not (v.isdigit() and 0 < int(v) < 65536)]:
        raise UsageError(f"{args.config}: {', '.join(bad)} must be a port number (1-65535)")
    grpc_ports = tuple(int(v) for v in grpc.values())
    overrides = {"enable_model_api": "true"} if getattr(args, "enable_model_api", False) else None
    server = TorchServe(model_store=args.model_store, config=args.config, ports=ports, grpc_ports=grpc_ports,
                        overrides=overrides, log_dir=str(getattr(args, "log_dir", None) or REPO / "logs"),
                        workdir=getattr(args, "run_dir", None) or RUN_DIR)
    starting = _starting_file(state_file)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(path=starting, obj={"serve_pid": os.getpid()})
    signal.signal(signal.SIGTERM, _terminate)  # from here on, start-up included, SIGTERM stops what was started
    try:
        server.start(foreground=True)
        try:
            write_json(path=state_file, obj=server.state())  # atomic: a crash never leaves half a state file
            starting.unlink(missing_ok=True)
            _announce(server, args.model_store, grpc_ports)
        except BaseException:  # a full disk, a closed stdout: nothing could find this server again to stop it
            server.stop(timeout=20)
            raise
        server.launcher.wait()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it has exited: nothing left to stop
        state = _read_state(state_file)
        asked = not state or state.get("stopping")  # `make stop` marks it, then removes it
    except (RuntimeError, TimeoutError) as e:
        print(f"TorchServe did not start: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminate) as e:  # while starting (start() stopped what it had begun) or serving
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        server.stop(drain_timeout=30 if isinstance(e, Terminate) and state_file.is_file() else 0)
        asked = True
    finally:
        starting.unlink(missing_ok=True)
        if server.launcher is not None:  # this serve launched one (not refused beside another): its files go
            server.forget_keys()  # the Java process has ended: its keys are void
            state_file.unlink(missing_ok=True)
    if not asked:  # killed (the OOM killer, kill -9) or crashed: a supervisor must see a failure
        print(f"TorchServe PID {server.pid} exited without `make stop`, Ctrl-C or SIGTERM: see "
              f"{server.log_dir / 'ts_log.log'}", file=sys.stderr, flush=True)
        return 1
    return 0


def _announce(server: TorchServe, model_store: str, grpc_ports: tuple[int, int]) -> None:
    p = server.props
    http = {k: p.get(f"{k}_address", "").strip() for k in ("inference", "management", "metrics")}
    grpc = {k: p.get(f"grpc_{k}_address", "0.0.0.0").strip() for k in ("inference", "management")}
    print(f"TorchServe (PID {server.pid}) serving {model_store} at {http['inference']}, management "
          f"{http['management']}, metrics {http['metrics']}/metrics, gRPC {grpc['inference']}:{grpc_ports[0]} "
          f"(inference) and {grpc['management']}:{grpc_ports[1]} (management); stop with Ctrl-C or `make stop`",
          flush=True)
    hosts = {**{k: urllib.parse.urlsplit(a).hostname for k, a in http.items()},
             **{f"gRPC {k}": h.strip("[]") for k, h in grpc.items()}}
    exposed = [f"{k} on {h}" for k, h in hosts.items() if h not in LOOPBACK]
    if exposed and not server.token_auth:
        print(f"warning: listening beyond this machine ({', '.join(exposed)}) with token authorization off: anyone "
              "who reaches it may use the management API (scale, unregister); serve config.prod.properties "
              "(CONFIG=config.prod.properties) or bind 127.0.0.1", file=sys.stderr, flush=True)
    if server.token_auth:
        print(f"token authorization on: keys in {server.key_file} (send 'Authorization: Bearer KEY'; "
              f"inference key for {server.url}, management key for {server.management_url})", flush=True)
    if server.props.get("enable_model_api", "false").lower() == "true":
        urls = server.props.get("allowed_urls") or "TorchServe's default: any file:// or http(s):// URL"
        print(f"model registration over the management API is on (allowed_urls={urls})", flush=True)


def _read_state(path: Path) -> dict:
    """The state file's content; one that cannot be read (written by hand, a disk error) is stale: ``{}``."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _is_serve(pid) -> bool:
    """``pid`` is a live ``python -m scripts.ts_server serve``."""
    try:
        cmdline = psutil.Process(pid).cmdline() if isinstance(pid, int) else []
    except psutil.Error:
        return False
    return "scripts.ts_server" in cmdline and "serve" in cmdline


def stop(args: argparse.Namespace) -> int:
    state_file = Path(getattr(args, "state_file", None) or STATE_FILE)
    drain_timeout = float(getattr(args, "drain_timeout", 30))
    if not state_file.is_file():
        serve_pid = _read_state(_starting_file(state_file)).get("serve_pid")
        if _is_serve(serve_pid):  # still starting: `serve` stops what it started on SIGTERM, then exits
            process = psutil.Process(serve_pid)
            process.terminate()
            exited = _exited(process, timeout=EXIT_TIMEOUT)
            print(f"`make serve` (PID {serve_pid}) was still starting: "
                  f"{'stopped' if exited else f'sent SIGTERM; it has not exited in {EXIT_TIMEOUT:.0f} s'}", flush=True)
            return 0
        print("no TorchServe started by `make serve` is running")
        return 0
    state = _read_state(state_file)
    pid = state.get("pid")
    if isinstance(pid, int) and not _ours_to_signal(pid) and _may_be_torchserve(pid):  # not a root daemon's now
        raise UsageError(f"TorchServe PID {pid} belongs to another user (started with sudo?): stop it as that user, "
                         "e.g. `sudo make stop`")
    if not is_torchserve(pid):  # gone (killed, the terminal closed, a reboot): its PID may be another process's now
        what = f"TorchServe PID {pid} is not running" if pid else f"{state_file} cannot be read"
        print(f"{what} (a stale {state_file}, removed); nothing to stop")
        state_file.unlink(missing_ok=True)
        return 0
    if drain_timeout > 0 and state.get("metrics_url") and state.get("access_log"):
        try:
            os.kill(pid, 0)
            result = drain(state["metrics_url"], state["access_log"], offset=state.get("access_log_offset", 0),
                           inode=state.get("access_log_inode"), ts_log=state.get("ts_log"),
                           ts_log_offset=state.get("ts_log_offset", 0), ts_log_inode=state.get("ts_log_inode"),
                           timeout=drain_timeout)
            if result["drained"]:
                n = len(result["busy_workers"])
                busy = f" ({n} busy worker{'s' * (n != 1)} now idle)" if n else ""
                answered = (f"{result['in_flight']} requests in flight answered" if result["in_flight"] is not None
                            else "every worker idle (the access log rolled over into a file that could not be read)")
                if result["reason"]:  # ended on idle workers with arrivals that no line will ever answer
                    answered = f"every worker idle, {result['reason']}"
                print(f"drained: {answered}{busy} in {result['seconds']} s", flush=True)
            else:
                print(f"not drained: {result['reason']}", flush=True)
        except ProcessLookupError:
            pass
    try:  # `serve` then knows the exit was asked for; a full disk must not keep the server from stopping
        write_json(path=state_file, obj={**state, "stopping": True})
    except OSError as e:  # no state at all says "asked" to `serve` as well (removing works on a full disk)
        state_file.unlink(missing_ok=True)
        print(f"could not mark {state_file} ({e}): removed it; stopping", flush=True)
    try:
        process = psutil.Process(pid)
        process.terminate()
        print(f"sent SIGTERM to TorchServe PID {pid}", flush=True)
    except psutil.NoSuchProcess:
        print(f"TorchServe PID {pid} was not running")
    else:  # return once it is gone, so that `make stop && make serve` finds the ports free
        if _exited(process, timeout=EXIT_TIMEOUT):
            print(f"TorchServe PID {pid} exited", flush=True)
        else:
            kill_trees(pid)  # Java and its workers: a worker stuck in a forward pass outlives its Java otherwise
            print(f"TorchServe PID {pid} did not exit in {EXIT_TIMEOUT:.0f} s: killed with its workers", flush=True)
    state_file.unlink(missing_ok=True)
    return 0


def wait(args: argparse.Namespace) -> int:
    """Until the state file names a live, ready TorchServe (not one being stopped); exit 1 when no ``serve`` is
    starting one (after :data:`WAIT_GRACE`) or after ``--timeout`` seconds."""
    state_file = Path(getattr(args, "state_file", None) or STATE_FILE)
    timeout = float(getattr(args, "timeout", 180))
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout:g}")
    t0 = time.monotonic()
    while True:
        state = _read_state(state_file)
        if state.get("pid") and not state.get("stopping") and is_torchserve(state["pid"]):
            print(f"ready: {state.get('url', 'TorchServe')} (PID {state['pid']})", flush=True)
            return 0
        waited = time.monotonic() - t0
        starting = _is_serve(_read_state(_starting_file(state_file)).get("serve_pid"))
        if not starting and _read_state(state_file) != state:  # serve wrote it, then removed its starting file
            continue
        if waited >= WAIT_GRACE and not starting:
            stale = f"; {state_file} is stale" if state else ""
            print(f"no `make serve` is starting TorchServe (waited {waited:.0f} s{stale}): start one (`make serve &`), "
                  "or see its output for why it exited", file=sys.stderr)
            return 1
        if waited >= timeout:
            print(f"TorchServe not ready after {timeout:g} s (`make serve` is still starting it: see "
                  f"logs/ts_log.log)", file=sys.stderr)
            return 1
        time.sleep(0.5)


def _may_be_torchserve(pid: int) -> bool:
    """A live TorchServe, or a live process whose command line cannot be read (``/proc`` mounted ``hidepid``)."""
    return is_torchserve(pid, unreadable=True)


def _ours_to_signal(pid: int) -> bool:
    """Whether this process may send ``pid`` a signal (another user's process: no)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return False
    except ProcessLookupError:
        pass
    return True


def _exited(process: psutil.Process, *, timeout: float) -> bool:
    """Whether ``process`` (not our child: ``serve``'s) ends within ``timeout`` s; a zombie has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.ts_server", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve MODEL_STORE in the foreground with config.properties",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="TorchServe config (config.prod.properties: the locked-down profile, token authorization on)")
    s.add_argument("--model-store", default=str(REPO / "model_store"), help="folder whose .mar archives are all served")
    s.add_argument("--enable-model-api", action="store_true",
                   help="allow model registration over the management API (enable_model_api=true; the config's "
                        "allowed_urls decides what may be registered)")
    s.add_argument("--run-dir", default=str(RUN_DIR), help=argparse.SUPPRESS)
    s.add_argument("--log-dir", default=str(REPO / "logs"), help=argparse.SUPPRESS)
    s.add_argument("--state-file", default=str(STATE_FILE), help=argparse.SUPPRESS)
    t = sub.add_parser("stop", help="stop the server started by `serve`, by its PID, after draining it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--drain-timeout", type=float, default=30,
                   help="seconds to wait for requests in flight to be answered before SIGTERM (0: no drain)")
    t.add_argument("--state-file", default=str(STATE_FILE), help=argparse.SUPPRESS)
    w = sub.add_parser("wait", help="return once the server started by `serve` is ready (exit 1: none is "
                                    "starting, or --timeout passed)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    w.add_argument("--timeout", type=float, default=180, help="seconds to wait at most")
    w.add_argument("--state-file", default=str(STATE_FILE), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return {"serve": serve, "stop": stop, "wait": wait}[args.command](args)


if __name__ == "__main__":  # a mistake (no archives, a wrong path, serving twice): one line, exit status 2
    sys.exit(run_cli(main))
