"""Median seconds per call, measured with ``torch.utils.benchmark.Timer``.

One timing loop for every in-process measurement of the benchmarks. The Timer warms up while it
picks how many calls make one block (so the first, slow calls are not measured), synchronizes the
accelerator around every block (CUDA work is counted to its end), and reports the median over the
blocks, which an outlier (a page fault, another process) does not move. ``blocked_autorange`` runs
for at least ``min_run_time`` seconds; ``adaptive=True`` uses ``adaptive_autorange`` instead, which
stops once the blocks agree (IQR/median below ``threshold``) or after ``max_run_time``.

The Timer would run at one thread by default: here it keeps the threads torch has now, unless
``threads`` says otherwise (the benchmarks measure what a worker with that many threads gets).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils import benchmark


def measure(fn: Callable[[], object], *, min_run_time: float = 1.0, adaptive: bool = False,
            threshold: float = 0.1, max_run_time: float = 10.0,
            threads: int | None = None) -> benchmark.Measurement:
    """The Timer's ``Measurement`` of ``fn()`` (``.median``, ``.mean``, ``.iqr`` in seconds)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    if adaptive:
        return timer.adaptive_autorange(threshold=threshold, min_run_time=min_run_time, max_run_time=max_run_time)
    return timer.blocked_autorange(min_run_time=min_run_time)


def seconds_per_call(fn: Callable[[], object], **kwargs) -> float:
    """Median seconds one call of ``fn()`` takes (keywords as for ``measure``)."""
    return measure(fn, **kwargs).median


def rate(fn: Callable[[], object], items: int, **kwargs) -> float:
    """Items per second when one call of ``fn()`` handles ``items`` (images, samples)."""
    return items / seconds_per_call(fn, **kwargs)
