"""A TorchServe's process tree (psutil): CPU time of all of it, and its Python worker processes.

The Java frontend is the PID ``TorchServe`` records; each model worker is a child process running
``model_service_worker``. A process that ends while it is being read is skipped, not an error.
"""
from __future__ import annotations

import psutil

WORKER_MARK = "model_service_worker"  # in the command line of every TorchServe Python worker


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants so far (0.0 when ``pid`` is gone)."""
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0.0
    return processes_cpu(procs)


def processes_cpu(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` so far; one that has ended counts 0."""
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def worker_processes(pid: int) -> list[psutil.Process]:
    """The live (not zombie) worker processes below the Java frontend ``pid``; raises ``psutil.Error``
    when ``pid`` itself is gone."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(WORKER_MARK in a for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out
