"""The CPU cores each party used in the steady part of one locust run: frontend, workers, locust, the machine.

A served run's img/s is locust's count over its run; the CPU seconds of the processes from the start of
the locust command to its end would also count locust's own start-up (importing gevent and locust, about
a CPU-second) and the idle server around it. ``CpuWindow``, a context manager around the run, waits until
locust's stats history has its first row (locust writes it as the test starts, and all users spawn at
once), then reads the cumulative CPU time of TorchServe's Java frontend (its PID), of its Python workers
(``tools.processes.worker_processes``), of the locust process tree and of the whole machine
(the CPUs of this process's affinity, from ``/proc/stat``) ``settle`` seconds later and again ``margin``
seconds before the run ends. ``cores`` are the differences over the window's wall time: 2.0 is both cores
of a 2-core machine all the time. In a container restricted to some of the host's CPUs (its cpuset), the
machine is those CPUs: the host's other tenants are neither busy time nor cores of this run.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil

from inference.threads import available_cores
from tools.processes import processes_cpu, worker_processes

_NOT_BUSY = (3, 4, 8, 9)  # /proc/stat's idle, iowait, guest, guest_nice columns (user, nice, ... from 0)


def _started(history_csv: Path) -> bool:
    """Whether locust has written a data row (after the header) to its stats history."""
    try:
        with open(history_csv) as f:
            return sum(1 for line in f if line.strip()) > 1
    except OSError:
        return False


def _locust_tree() -> list[psutil.Process]:
    """This process's locust children (and their forks, for ``--processes``)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("locust" in a for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def machine_busy(cpus: set[int] | None = None) -> float:
    """CPU seconds that ``cpus`` (default: this process's affinity) have spent outside idle and iowait since
    boot; steal (the hypervisor's share of a virtual CPU) counts as busy, guest time only once (Linux counts it
    in user already). Without ``/proc/stat``, or when none of its rows is one of ``cpus``: the whole machine's,
    from psutil."""
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        rows = None
    mine = [row for row in rows or [] if cpus is not None and int(row[0][3:]) in cpus]
    if not mine:  # no /proc/stat, or one that numbers CPUs otherwise (LXCFS renumbers them): the whole machine
        t = psutil.cpu_times()
        return sum(t) - t.idle - sum(getattr(t, k, 0.0) for k in ("iowait", "guest", "guest_nice"))
    ticks = 0
    for row in mine:
        values = [int(v) for v in row[1:]]
        ticks += sum(values) - sum(values[i] for i in _NOT_BUSY if i < len(values))
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """``with CpuWindow(pid, history_csv=..., seconds=...) as w: <locust run>``; then ``w.result`` is None
    (the run never started or was too short) or ``{"window_s", "frontend_cores", "workers_cores",
    "locust_cores", "machine_busy_cores", "cores"}``."""

    def __init__(self, server_pid: int, *, history_csv: str | Path, seconds: float, settle: float | None = None,
                 margin: float | None = None, poll: float = 0.05):
        self.pid, self.history_csv, self.poll = server_pid, Path(history_csv), poll
        self.settle = min(2.0, seconds / 4) if settle is None else settle
        self.end = seconds - (min(1.5, seconds / 4) if margin is None else margin)
        self.result: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-window", daemon=True)

    def __enter__(self) -> "CpuWindow":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _snapshot(self) -> dict:
        try:
            frontend = processes_cpu([psutil.Process(self.pid)])
            workers = processes_cpu(worker_processes(self.pid))
        except psutil.Error:
            frontend = workers = 0.0
        return {"t": time.perf_counter(), "frontend": frontend, "workers": workers,
                "locust": processes_cpu(_locust_tree()), "machine_busy": machine_busy()}

    def _run(self) -> None:
        while not _started(self.history_csv):
            if self._stop.wait(self.poll):
                return
        t0 = time.perf_counter()
        if self.end <= self.settle or self._stop.wait(self.settle):
            return
        a = self._snapshot()
        if self._stop.wait(max(0.0, t0 + self.end - time.perf_counter())):
            return
        b = self._snapshot()
        wall = b["t"] - a["t"]
        self.result = {"window_s": round(wall, 3), "cores": available_cores(),
                       **{f"{k}_cores": (b[k] - a[k]) / wall for k in ("frontend", "workers", "locust", "machine_busy")}}
