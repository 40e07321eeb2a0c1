"""Threads per TorchServe worker, so that several workers never oversubscribe the CPU, and their re-sizing
when the number of workers of the model changes (``PUT /models/NAME?min_worker=N``).

How a worker knows how many workers its model has: TorchServe 0.12 starts every Python worker as a
child of the Java frontend, running ``ts/model_service_worker.py``, with the model's unpacked folder
(``model_dir``) as its working directory. :func:`live_workers` counts the frontend's children that
match both, from ``/proc`` (Linux; no management API call, so it works with token authorization on).
:class:`WorkerThreads` counts at start-up and then, rate-limited, at the start of a batch; a new count
is acted on when two counts in a row agree (a worker that crashes and is restarted does not re-size its
siblings twice).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

WORKER_MARK = b"model_service_worker"  # in the command line of every TorchServe Python worker


def available_cores() -> int:
    """The CPUs this process may run on (its affinity), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_threads(configured: int = 0, *, workers: int = 1, env: dict | None = None, cores: int | None = None) -> int:
    """Threads for one worker's forward and decode pool, so that workers never oversubscribe the CPU.

    ``configured`` (model-config.yaml ``threads``) wins; then ``OMP_NUM_THREADS`` from the worker's
    environment (a container's CPU limit is set this way: ``os.cpu_count()`` there is the node's); else
    the CPUs this process may run on, divided among the workers.
    """
    fixed = fixed_threads(configured, env=env)
    if fixed:
        return fixed
    return max(1, (available_cores() if cores is None else cores) // max(1, workers))


def fixed_threads(configured: int = 0, *, env: dict | None = None) -> int:
    """The thread count someone chose (``threads`` in model-config.yaml, else ``OMP_NUM_THREADS``); 0: none."""
    if configured and int(configured) > 0:
        return int(configured)
    env = os.environ if env is None else env
    try:
        return max(0, int(env.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def live_workers(model_dir: str, *, parent: int | None = None, proc: str = "/proc") -> int:
    """Live (not zombie) TorchServe worker processes of the model unpacked in ``model_dir``: children of
    ``parent`` (default: this process's parent, the frontend) whose working directory is ``model_dir``
    and whose command line runs ``model_service_worker``. 0 where ``/proc`` cannot tell (not Linux, or
    this process is not a TorchServe worker)."""
    parent = os.getppid() if parent is None else parent
    target = os.path.realpath(model_dir)
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return 0
    count = 0
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
            if int(ppid) != parent or state == b"Z" or os.readlink(f"{proc}/{pid}/cwd") != target:
                continue
            with open(f"{proc}/{pid}/cmdline", "rb") as f:
                count += WORKER_MARK in f.read()
        except (OSError, ValueError, IndexError):  # ended meanwhile, or not ours to read
            continue
    return count


@dataclass(frozen=True)
class Change:
    """A change of the model's live worker count, and what it did to this worker's threads."""
    workers_before: int
    workers: int
    threads_before: int
    threads: int


class WorkerThreads:
    """One worker's thread count (torch intra-op threads, the decode pool, the runtime's session) and its
    re-sizing to the model's live workers.

    ``configured`` > 0 (model-config.yaml ``threads``) or ``OMP_NUM_THREADS`` fix the count: it is then
    kept, and a warning is logged whenever workers x threads exceeds the cores. Otherwise threads =
    cores // live workers, re-sized by :meth:`follow` (at most one count per ``interval`` seconds; 0: only
    the start-up count). ``rebuild(threads)`` re-creates what cannot change its threads after creation
    (an ONNX Runtime session, an OpenVINO compiled model); ``workers`` is the count to assume where
    :func:`live_workers` cannot tell (the archive's minWorkers).
    """

    def __init__(self, *, configured: int = 0, workers: int = 1, model_dir: str | None = None,
                 interval: float = 2.0, name: str = "", env: dict | None = None, cores: int | None = None,
                 counter: Callable[[str], int] = live_workers, clock: Callable[[], float] = time.monotonic):
        self.cores = available_cores() if cores is None else cores
        self.fixed = fixed_threads(configured, env=env)
        self.model_dir, self.interval, self.name = model_dir, interval, name
        self.counter, self.clock = counter, clock
        self.workers = (counter(model_dir) if model_dir else 0) or max(1, workers)
        self.threads = self._threads_for(self.workers)
        self.rebuild: Callable[[int], None] | None = None
        self._pending: int | None = None
        self._last = clock()
        torch.set_num_threads(self.threads)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")
        self._warn_if_oversubscribed()

    def _threads_for(self, workers: int) -> int:
        return self.fixed or max(1, self.cores // max(1, workers))

    @property
    def oversubscribed(self) -> bool:
        return self.workers * self.threads > self.cores

    def _warn_if_oversubscribed(self) -> None:
        if self.oversubscribed:
            why = "fixed by model-config.yaml threads or OMP_NUM_THREADS" if self.fixed else "1 is the least"
            log.warning("%s: %d live workers x %d threads (%s) > %d cores: the CPU is oversubscribed; serve with "
                        "fewer workers, or set threads so that workers x threads <= cores", self.name, self.workers,
                        self.threads, why, self.cores)

    def check(self) -> Change | None:
        """Count the live workers (rate-limited) and return the :class:`Change` to make now, if any."""
        if self.interval <= 0 or not self.model_dir or self.clock() - self._last < self.interval:
            return None
        self._last = self.clock()
        count = self.counter(self.model_dir)
        if count <= 0 or count == self.workers:
            self._pending = None
            return None
        if self._pending != count:  # act on the second count in a row that agrees
            self._pending = count
            return None
        self._pending = None
        change = Change(self.workers, count, self.threads, self._threads_for(count))
        self.workers, self.threads = count, change.threads
        return change

    def follow(self) -> Change | None:
        """:meth:`check`, and apply its change: torch's threads, a new decode pool, ``rebuild``; logged."""
        change = self.check()
        if change is None:
            return None
        if change.threads != change.threads_before:
            start = time.perf_counter()
            try:  # the runtime first: where it cannot be re-created, nothing else changes either
                if self.rebuild is not None:
                    self.rebuild(change.threads)
            except Exception:  # e.g. out of memory: the old session keeps serving with its threads, and its count
                log.exception("%s: re-creating the runtime with %d threads failed", self.name, change.threads)
                self.threads = change.threads_before  # stays what the metric reports
                change = Change(change.workers_before, change.workers, change.threads_before, self.threads)
            else:
                torch.set_num_threads(change.threads)
                old, self.pool = self.pool, ThreadPoolExecutor(max_workers=change.threads, thread_name_prefix="decode")
                old.shutdown(wait=False)
            log.info("%s: %d live workers (were %d): %d threads per worker (were %d), re-sized in %.0f ms",
                     self.name, change.workers, change.workers_before, change.threads, change.threads_before,
                     (time.perf_counter() - start) * 1000)
        else:
            log.info("%s: %d live workers (were %d): %d threads per worker (unchanged)", self.name,
                     change.workers, change.workers_before, change.threads)
        self._warn_if_oversubscribed()
        return change
