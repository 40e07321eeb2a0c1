"""``python -m benchmarks.frontend_cost``: what TorchServe itself costs per request, with no model at all.

A do-nothing handler (:mod:`benchmarks.echo_handler`: it answers each request with its body's length)
in a TorchServe of its own, loaded by client threads (``http.client``, keep-alive, raw JPEG bodies as
``locustfile.py`` sends them) with the photos of ``tools.photos`` (500x375 and 12 MP phone photos).
After an uncounted warm-up it prints, per request and per payload set, the CPU milliseconds of

* the Java frontend, split by thread group (``/proc/PID/task``): Netty's event loops (receiving the
  body, writing it to the worker's socket), the per-worker threads, the JIT compilers, the garbage
  collector, the rest;
* the Python worker (TorchServe's ``model_service_worker``: reading the body off its socket);
* this client.

The JIT compilers' share falls as the server warms (``--warmup``): short runs on a fresh server pay
it, a long-running one does not. ``--vmargs`` passes JVM options (TorchServe's ``vmargs``). These are
the floors that no handler change removes; the figures are in docs/performance.md.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.report import isa_class
from export.archive import run_archiver
from tools.photos import photo_jpegs
from tools.processes import processes_cpu, worker_processes
from tools.torchserve import TorchServe

HANDLER = Path(__file__).with_name("echo_handler.py")
MODEL = "echo"
SETS = ("jpeg500", "phone12mp")
# Java thread names (``/proc/PID/task/*/comm``, 15 characters at most) -> the group they are reported in
GROUPS = (("netty", r"^epollEventLoop|^nioEventLoop"), ("workers", r"^W-"), ("jit", r"Compiler"),
          ("gc", r"^GC |^G1 |^VM Thread"))


def thread_cpu(pid: int) -> collections.Counter:
    """CPU seconds of each thread group (:data:`GROUPS`, else ``other``) of process ``pid`` so far, over
    its live threads (the frontend's are: event loops, worker and compiler threads live as long as it)."""
    out: collections.Counter = collections.Counter()
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended while being read
            continue
        group = next((g for g, pattern in GROUPS if re.search(pattern, name)), "other")
        out[group] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def load(url: str, bodies: list[bytes], *, requests: int, clients: int) -> None:
    """``requests`` POSTs per client thread to ``/predictions/echo``, each checked for its 200 and length."""
    host, port = url.rsplit("//", 1)[1].split(":")
    errors: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            for i in range(requests):
                body = bodies[(i + k) % len(bodies)]
                conn.request("POST", f"/predictions/{MODEL}", body=body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                answer = resp.read()
                if resp.status != 200 or answer.strip() != str(len(body)).encode():
                    errors.append(f"HTTP {resp.status}: {answer[:200]!r}")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"the echo model answered wrongly: {errors[0]}")


def measure(server: TorchServe, bodies: list[bytes], *, requests: int, clients: int, warmup: int) -> dict:
    """Per-request CPU milliseconds of the frontend (by thread group), the worker and this client."""
    load(server.url, bodies, requests=warmup, clients=clients)
    me, workers = psutil.Process(), worker_processes(server.pid)
    java0, worker0, me0 = thread_cpu(server.pid), processes_cpu(workers), processes_cpu([me])
    t0 = time.perf_counter()
    load(server.url, bodies, requests=requests, clients=clients)
    seconds = time.perf_counter() - t0
    java1, worker1, me1 = thread_cpu(server.pid), processes_cpu(workers), processes_cpu([me])
    n = requests * clients
    java = {g: 1000 * (java1[g] - java0.get(g, 0.0)) / n for g in sorted(java1)}
    return {"requests": n, "req_s": n / seconds, "mb": sum(map(len, bodies)) / len(bodies) / 1e6,
            "java_ms": sum(java.values()), "java_groups_ms": java,
            "worker_ms": 1000 * (worker1 - worker0) / n, "client_ms": 1000 * (me1 - me0) / n}


def echo_archive(store: Path) -> None:
    store.mkdir(parents=True, exist_ok=True)
    run_archiver(["--model-name", MODEL, "--version", "1.0", "--handler", str(HANDLER), "--export-path", str(store),
                  "--force"]).check_returncode()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=4, help="photos per payload set")
    p.add_argument("--requests", type=int, default=150, help="measured requests per client thread and set")
    p.add_argument("--warmup", type=int, default=400, help="uncounted requests per client thread before each set")
    p.add_argument("--clients", type=int, default=4, help="client threads (keep-alive connections)")
    p.add_argument("--vmargs", default="", help="JVM options for TorchServe's frontend (its vmargs setting)")
    args = p.parse_args(argv)
    for name in ("photos", "requests", "clients"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"isa={isa_class()} cores={os.cpu_count()} clients={args.clients} warmup={args.warmup} "
          f"requests={args.requests} vmargs={args.vmargs or '(TorchServe default)'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="frontend-cost-") as tmp:
        store = Path(tmp) / "store"
        echo_archive(store)
        overrides = {"default_workers_per_model": "1", **({"vmargs": args.vmargs} if args.vmargs else {})}
        with TorchServe(model_store=store, models=f"{MODEL}={MODEL}.mar", overrides=overrides) as server:
            for set_name in SETS:
                bodies = [data for _, data in photo_jpegs(set_name, limit=args.photos)]
                r = measure(server, bodies, requests=args.requests, clients=args.clients, warmup=args.warmup)
                groups = " ".join(f"{g} {ms:.2f}" for g, ms in r["java_groups_ms"].items())
                print(f"{set_name:<10} {r['mb']:5.2f} MB  {r['req_s']:6.1f} req/s  CPU ms/request: java "
                      f"{r['java_ms']:5.2f} ({groups})  worker {r['worker_ms']:5.2f}  client {r['client_ms']:5.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
