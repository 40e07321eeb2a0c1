"""``make serve`` / ``make stop``: serve model_store/ with TorchServe in the foreground; drain and stop it by PID.

    python -m scripts.ts_server serve    # foreground, serves model_store/ with config.properties
    python -m scripts.ts_server stop     # drains, then stops that server by its PID

``serve`` records the server's PID, addresses and access-log offset in ``.torchserve/server.json``;
``stop`` reads that file, waits (``--drain-timeout``, 30 s) until the requests that had arrived are
answered (TorchServe 0.12 itself cuts them on SIGTERM: see ``tools/drain.py``), then sends SIGTERM.
The process lifecycle itself is ``tools.torchserve.TorchServe``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path

from tools import REPO
from tools.drain import drain
from tools.torchserve import DEFAULT_CONFIG, TorchServe, read_properties

STATE_FILE = REPO / ".torchserve" / "server.json"


def serve(args: argparse.Namespace) -> int:
    props = read_properties(args.config)
    ports = tuple(int(re.search(r":(\d+)", props[k]).group(1))
                  for k in ("inference_address", "management_address", "metrics_address"))
    grpc_ports = (int(props.get("grpc_inference_port", 7070)), int(props.get("grpc_management_port", 7071)))
    server = TorchServe(model_store=args.model_store, config=args.config, ports=ports, grpc_ports=grpc_ports,
                        log_dir=str(REPO / "logs"))
    if not any(Path(args.model_store).glob("*.mar")):
        print(f"no .mar archives in {args.model_store}: run `make demo` (or `python -m export archive ...`) first")
        return 1
    server.start(foreground=True)
    STATE_FILE.parent.mkdir(exist_ok=True)
    STATE_FILE.write_text(json.dumps(server.state()))
    print(f"TorchServe (PID {server.pid}) serving {args.model_store} at {server.url}, management "
          f"{server.management_url}, metrics {server.metrics_url}/metrics, gRPC 127.0.0.1:{grpc_ports[0]} "
          f"(inference) and 127.0.0.1:{grpc_ports[1]} (management); stop with Ctrl-C or `make stop`", flush=True)
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
