"""The handler's metrics: one definition of each name, its type and unit (the repository's ``metrics.yaml``
declares the same ones, for TorchServe's ``metrics_config``), and their values for one batch.

The stage timings are Prometheus histograms in seconds: TorchServe 0.12 builds every histogram with the
Prometheus client's default buckets (5 ms to 10 s, no setting changes them), which suit latencies in
seconds; p50/p99 come from the ``_bucket`` lines (``histogram_quantile``). The same timings stay gauges
in milliseconds (the last batch's value) for dashboards that read those. The gauges are one worker's last
batch, overwritten by the next batch of any worker; the counters add up every batch of every worker, so rates
and ratios over time come from them: TTA's trigger rate is ``rate(TTAImagesTotal) / rate(ImagesTotal)``, views
per image ``rate(ForwardViewsTotal) / rate(ImagesTotal)``, errors per status ``rate(RequestErrorsTotal)``. A
batch whose forward failed counts in ``RequestErrorsTotal`` (500), not in the image counters nor the TTA gauges.
"""
from __future__ import annotations

from collections import Counter

HISTOGRAM, GAUGE, COUNTER = "histogram", "gauge", "counter"
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
    "ImagesTotal": (COUNTER, "count", "images through the forward"),
    "TTAImagesTotal": (COUNTER, "count", "images among them that got TTA (every one with TTA; adaptive: the uncertain)"),
    "ForwardViewsTotal": (COUNTER, "count", "views through the forward (the images' views, TTA's included)"),
    "RequestErrorsTotal": (COUNTER, "count", "requests answered with an error, by HTTP status (503: busy, retry)"),
}
DIMENSIONS = ("ModelName", "Level")
EXTRA_DIMENSIONS = {"RequestErrorsTotal": ("Status",)}  # after DIMENSIONS, in this order


def dimensions(name: str) -> tuple[str, ...]:
    """The dimension names of metric ``name``, in the order metrics.yaml declares and the handler passes them."""
    return DIMENSIONS + EXTRA_DIMENSIONS.get(name, ())


def batch_metrics(batch, *, views: int, adaptive: bool, threads: int, workers: int,
                  error_statuses=()) -> list[tuple[str, float, tuple[str, ...]]]:
    """``(name, value, extra dimension values)`` of every metric of one batch (a :class:`inference.batch.Batch`);
    ``error_statuses``: the HTTP status of each request answered with an error."""
    out = []
    for stage in STAGES:
        if stage in batch.timings:
            ms = batch.timings[stage]
            out += [(f"{stage.capitalize()}Seconds", round(ms / 1000, 6), ()), (f"{stage.capitalize()}Ms", round(ms, 3), ())]
    out += [("BatchSize", batch.size, ()), ("WorkerThreads", threads, ()), ("LiveWorkers", workers, ())]
    images = len(batch.owners)
    if images and batch.failure is None:
        applied = int(batch.tta_applied.sum()) if batch.tta_applied is not None else 0
        used = images + applied * (views - 1) if adaptive else images * views
        out.append(("TTAViewsPerImage", round(used / images, 3), ()))
        if adaptive:
            out.append(("AdaptiveTTATriggerRate", round(100.0 * applied / images, 2), ()))
        out += [("ImagesTotal", images, ()), ("TTAImagesTotal", applied if adaptive else images * (views > 1), ()),
                ("ForwardViewsTotal", used, ())]
    out += [("RequestErrorsTotal", n, (str(status),)) for status, n in sorted(Counter(error_statuses).items())]
    return out
