"""Where flip TTA's cost goes, in-process: ``inference.tta.predict_proba`` against a plain forward.

    python -m benchmarks.tta_cost --graph benchmarks/.work/full/resnet50/export_resnet50/model.onnx

``breakdown`` times, with ONE backend at ``threads`` threads (what one worker of the flip
configuration has) and the served batch of ``batch`` images, in ``rounds`` interleaved rounds (each
round times every item once: a slow moment of the machine hits all of them alike), each time the
median of ``torch.utils.benchmark`` blocks (``tools.timing``), reported as the median over the rounds:

* ``decode``: header probe + decode + canvas of the batch (the part TTA does not touch);
* ``views_none`` / ``views_flip``: ``tta_views`` and the contiguous copy the backend makes of them;
* ``forward_n`` / ``forward_2n`` / ``forward_n_x2``: the backend on the n plain views, on the 2n flip
  views in one call, and as two calls of n (does the batch shape matter?);
* ``predict_none`` / ``predict_flip``: ``predict_proba`` end to end (views + forward + aggregation);
* ``aggregate``: the mean softmax over the views.

Ratios: ``forward_2n_over_n`` (2.0 when the forward scales with the views), ``predict_flip_over_none``
and ``pipeline_flip_over_none`` ((decode + predict flip) / (decode + predict none): what a worker's
throughput ratio would be without TorchServe). ``make bench`` records it next to the served
``flip_tta_cost``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.configs import BATCH
from tools.photos import jpeg_files


def breakdown(graph: str, *, payloads, crop_size: int, resize_size: int, threads: int = 1, batch: int = BATCH,
              precision: str = "f32", min_run_time: float = 1.0, rounds: int = 3) -> dict:
    """The timings of the module docstring (``ms``) and their ratios."""
    from inference.backends import load_backend
    from inference.images import decode_many, probe
    from inference.tta import aggregate, canvas_preset, predict_proba, tta_views
    from tools.timing import seconds_per_call

    torch.set_num_threads(threads)
    backend = load_backend(graph, threads=threads, precision=precision)
    datas = [Path(p).read_bytes() for p in payloads][:batch]
    datas = (datas * (batch // len(datas) + 1))[:batch]
    preset = canvas_preset("flip", crop_size=crop_size, resize_size=resize_size)
    pool = ThreadPoolExecutor(max_workers=threads)

    def decode():
        infos = [probe(d) for d in datas]
        return torch.stack(decode_many(datas, infos=infos, pool=pool, transform=preset,
                                       min_side=preset.min_decode_side))
    canvas = decode()
    plain = tta_views(canvas, "none", crop_size=crop_size).contiguous()
    flipped = tta_views(canvas, "flip", crop_size=crop_size).contiguous()
    logits = backend(flipped)

    items = {  # name -> (function, share of min_run_time)
        "decode": (decode, 1),
        "views_none": (lambda: tta_views(canvas, "none", crop_size=crop_size).contiguous(), 0.25),
        "views_flip": (lambda: tta_views(canvas, "flip", crop_size=crop_size).contiguous(), 0.25),
        "aggregate": (lambda: aggregate(logits, batch), 0.25),
        "forward_n": (lambda: backend(plain), 1),
        "forward_2n": (lambda: backend(flipped), 2),
        "forward_n_x2": (lambda: (backend(flipped[:batch]), backend(flipped[batch:])), 2),
        "predict_none": (lambda: predict_proba(backend, canvas, "none", crop_size=crop_size), 1),
        "predict_flip": (lambda: predict_proba(backend, canvas, "flip", crop_size=crop_size), 2)}
    samples: dict[str, list[float]] = {k: [] for k in items}
    for _ in range(max(1, rounds)):
        for name, (fn, share) in items.items():
            samples[name].append(seconds_per_call(fn, min_run_time=min_run_time * share, threads=threads) * 1000)
    pool.shutdown()
    ms = {k: statistics.median(v) for k, v in samples.items()}
    return {"threads": threads, "batch": batch, "graph": Path(graph).name, "rounds": max(1, rounds), "ms": ms,
            "ms_rounds": samples,
            "forward_2n_over_n": ms["forward_2n"] / ms["forward_n"],
            "forward_n_x2_over_n": ms["forward_n_x2"] / ms["forward_n"],
            "predict_flip_over_none": ms["predict_flip"] / ms["predict_none"],
            "pipeline_flip_over_none": (ms["decode"] + ms["predict_flip"]) / (ms["decode"] + ms["predict_none"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", required=True, help="an exported uint8 logits graph (.onnx/.xml) with export.json beside it")
    p.add_argument("--images", default=None, help="folder of JPEGs (default: the jpeg500 payload set of tools.photos)")
    p.add_argument("--threads", type=int, default=1, help="threads of the backend and decode pool (one worker's)")
    p.add_argument("--batch", type=int, default=BATCH, help="images per batch (the served batch size)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement (forward_2n: twice)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them are reported)")
    args = p.parse_args(argv)
    graph = Path(args.graph)
    manifest_path = graph.parent / "export.json"
    if not graph.is_file() or not manifest_path.is_file():
        print(f"error: {graph} or its export.json not found", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    payloads = jpeg_files(args.images, prefix="tta-cost-")
    if not payloads:
        print(f"error: no .jpg under {args.images}", file=sys.stderr)
        return 2
    b = breakdown(str(graph), payloads=payloads, crop_size=manifest["input_size"], resize_size=manifest["resize_size"],
                  threads=args.threads, batch=args.batch, min_run_time=args.min_run_time, rounds=args.rounds)
    for k, v in b["ms"].items():
        print(f"{k:<14} {v:9.2f} ms  (rounds: {', '.join(f'{x:.2f}' for x in b['ms_rounds'][k])})")
    print(" ".join(f"{k}={b[k]:.3f}" for k in ("forward_2n_over_n", "forward_n_x2_over_n", "predict_flip_over_none",
                                                "pipeline_flip_over_none")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
