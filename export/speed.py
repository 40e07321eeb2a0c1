"""How much faster an INT8 graph is than its fp32 source: timed in turns, per core and per process.

The parity table's ``ms/img`` is one 0.2 s measurement per variant, taken minutes apart (INT8's accuracy
control runs in between), with each runtime's default threads: too noisy for a ratio, and not the figure
that decides a CPU server's throughput. On a machine of C cores a server runs W workers x T threads; the
bench's split search (``benchmarks/configs.py``) picks C workers x 1 thread for every configuration on 2
cores. So :func:`int8_speedup` times the INT8 graph and its fp32 graph

* on **one thread** (``per_core``): what each worker of a W x 1 server gets from its core, and
* on **all the threads** torch uses (``one_process``; the cores, unless ``torch.set_num_threads`` said
  otherwise): what one process on the whole machine gets,

in turns (``rounds`` x (fp32, INT8), each a ``torch.utils.benchmark`` measurement of ``min_run_time``
seconds at batch ``batch``) and compares the medians, so that a slow moment of a shared machine reaches
both graphs. The two differ most on small graphs, whose many tiny operations do not scale over threads:
on the Fashion-MNIST demo model (2-vCPU AMX Xeon, 2026-12-05) OpenVINO INT8 was 1.73x its fp32 graph on
one thread and 1.30x on two, where the attention gates' reductions took twice as long on two threads as on one
(docs/results.md).

A shared machine also has slow *phases* of seconds, when both graphs lose time at once (a neighbour on the
physical core: no steal time shows): on the 2-vCPU Ice Lake Xeon of 2026-12-07 the demo model's fp32 graph took
0.94 ms/img per core, then 1.51 for eight rounds in a row, then 0.94 again, and INT8 0.59 and 1.05 in the same
rounds, so the median's speedup was 1.42-1.45x in processes that ran in such a phase and 1.58-1.82x in quiet
ones. Each setting therefore also records its **fastest** round of each graph (``fp32_best_ms``, ``int8_best_ms``)
and their ratio (``best_speedup``): what the graphs do when the machine is quiet. The median stays the figure
that is judged; the best shows how far a slow phase moved it.
"""
from __future__ import annotations

import statistics

import torch

from inference.backends import load_backend


def ms_per_image(backend, batch: torch.Tensor, *, threads: int, min_run_time: float = 0.2) -> float:
    """ms per image of ``backend(batch)``: the median of ``torch.utils.benchmark.Timer`` blocks over
    ``min_run_time`` seconds, with torch at ``threads`` threads."""
    from torch.utils import benchmark  # here: importing it logs a CUDA warning on machines without one

    timer = benchmark.Timer(stmt="backend(batch)", globals={"backend": backend, "batch": batch}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1000 / len(batch)


def int8_speedup(fp32_path: str, int8_path: str, images: torch.Tensor, *, rounds: int = 9,
                 min_run_time: float = 0.15, batch: int = 8) -> dict[str, dict]:
    """``{"per_core": {"threads", "fp32_ms", "int8_ms", "speedup", "fp32_best_ms", "int8_best_ms",
    "best_speedup", "rounds"}, "one_process": {...}}``: ms per image of each graph on ``images[:batch]``, the
    median of ``rounds`` interleaved measurements and the fastest of them; ``speedup`` is fp32's median ms over
    INT8's, ``best_speedup`` the same of the fastest rounds."""
    x = images[:batch].contiguous()
    out = {}
    settings = {"per_core": 1, "one_process": torch.get_num_threads()}
    if settings["one_process"] == 1:  # one core: the two are the same
        del settings["one_process"]
    for setting, threads in settings.items():
        graphs = {"fp32": load_backend(fp32_path, threads=threads), "int8": load_backend(int8_path, threads=threads)}
        for backend in graphs.values():
            for _ in range(3):  # warm-up: first calls allocate and pick kernels
                backend(x)
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(rounds):
            for name, backend in graphs.items():
                times[name].append(ms_per_image(backend, x, threads=threads, min_run_time=min_run_time))
        fp32_ms, int8_ms = statistics.median(times["fp32"]), statistics.median(times["int8"])
        fp32_best, int8_best = min(times["fp32"]), min(times["int8"])
        out[setting] = {"threads": threads, "fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms,
                        "fp32_best_ms": fp32_best, "int8_best_ms": int8_best, "best_speedup": fp32_best / int8_best,
                        "rounds": rounds}
    return out


def describe(speed: dict[str, dict]) -> str:
    """``speed against its fp32 graph 1.78x on 1 thread (per core: 0.658 -> 0.369 ms/img, fastest rounds 1.81x),
    1.36x on 2 threads (one process: 0.497 -> 0.365 ms/img, fastest rounds 1.40x)`` (medians; a record made
    before the fastest rounds were kept has none)."""
    parts = []
    for key, label in (("per_core", "per core"), ("one_process", "one process")):
        s = speed.get(key)
        if s:
            threads = f"{s['threads']} thread" + ("s" if s["threads"] != 1 else "")
            best = f", fastest rounds {s['best_speedup']:.2f}x" if "best_speedup" in s else ""
            parts.append(f"{s['speedup']:.2f}x on {threads} ({label}: {s['fp32_ms']:.3f} -> {s['int8_ms']:.3f} ms/img"
                         f"{best})")
    return "speed against its fp32 graph " + ", ".join(parts)
