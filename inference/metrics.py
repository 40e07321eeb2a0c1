"""The handler's metrics: one definition of each name, its type and unit (the repository's ``metrics.yaml``
declares the same ones, for TorchServe's ``metrics_config``), and their values for one batch.

The stage timings are Prometheus histograms in seconds: TorchServe 0.12 builds every histogram with the
Prometheus client's default buckets (5 ms to 10 s, no setting changes them), which suit latencies in
seconds; p50/p99 come from the ``_bucket`` lines (``histogram_quantile``). The same timings stay gauges
in milliseconds (the last batch's value) for dashboards that read those.
"""
from __future__ import annotations

HISTOGRAM, GAUGE = "histogram", "gauge"
STAGES = ("decode", "preprocess", "forward")  # the handler's timed stages (Batch.timings, in ms)

# name -> (type, unit, what it measures); model metrics, dimensions ModelName and Level (Hostname is added)
METRICS = {
    **{f"{s.capitalize()}Seconds": (HISTOGRAM, "s", f"{s} time of one batch") for s in STAGES},
    **{f"{s.capitalize()}Ms": (GAUGE, "ms", f"{s} time of the last batch") for s in STAGES},
    "BatchSize": (GAUGE, "count", "requests in the last batch"),
    "TTAViewsPerImage": (GAUGE, "count", "views per image through the forward, last batch"),
    "AdaptiveTTATriggerRate": (GAUGE, "percent", "share of the last batch's images that got TTA (adaptive TTA)"),
    "WorkerThreads": (GAUGE, "count", "threads of the worker that answered last"),
    "LiveWorkers": (GAUGE, "count", "the model's live workers, as the worker that answered last counted them"),
}
DIMENSIONS = ("ModelName", "Level")


def batch_metrics(batch, *, views: int, adaptive: bool, threads: int, workers: int) -> list[tuple[str, float]]:
    """``(name, value)`` of every metric of one batch (a :class:`inference.batch.Batch`)."""
    out = []
    for stage in STAGES:
        if stage in batch.timings:
            ms = batch.timings[stage]
            out += [(f"{stage.capitalize()}Seconds", round(ms / 1000, 6)), (f"{stage.capitalize()}Ms", round(ms, 3))]
    out += [("BatchSize", batch.size), ("WorkerThreads", threads), ("LiveWorkers", workers)]
    images = len(batch.owners)
    if images:
        applied = int(batch.tta_applied.sum()) if batch.tta_applied is not None else 0
        used = images + applied * (views - 1) if adaptive else images * views
        out.append(("TTAViewsPerImage", round(used / images, 3)))
        if adaptive:
            out.append(("AdaptiveTTATriggerRate", round(100.0 * applied / images, 2)))
    return out
