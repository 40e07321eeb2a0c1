"""Threads per TorchServe worker, so that several workers never oversubscribe the CPU."""
from __future__ import annotations

import os


def worker_threads(configured: int = 0, *, workers: int = 1, env: dict | None = None, cores: int | None = None) -> int:
    """Threads for one worker's forward and decode pool, so that workers never oversubscribe the CPU.

    ``configured`` (model-config.yaml ``threads``) wins; then ``OMP_NUM_THREADS`` from the worker's
    environment (a container's CPU limit is set this way: ``os.cpu_count()`` there is the node's); else
    the CPUs this process may run on, divided among the workers.
    """
    if configured and int(configured) > 0:
        return int(configured)
    env = os.environ if env is None else env
    try:
        from_env = int(env.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        from_env = 0
    if from_env > 0:
        return from_env
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))
