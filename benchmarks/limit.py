"""The in-process limit: what a served configuration does without HTTP or TorchServe, in the SAME split.

``in_process_limit`` runs, for a configuration served as W workers x T threads, W fresh processes
(``multiprocessing``, forked from a fork server that has imported :data:`PRELOAD` once, so that each
round starts in a fraction of a second instead of importing torch again) of T threads each -- T intra-op threads for the backend and a decode
pool of T threads, as each TorchServe worker of the handler has -- all at once, each doing what one
worker does with a batch: header probe, decode + canvas (``inference.images.decode_many``, JPEGs
reduced as the handler decodes them), the TTA views and forward (``inference.tta``; adaptive TTA at the
served threshold), top-k, at the served batch size through the same exported graph and backend
settings. Each process is timed by ``tools.timing`` (median over blocks of
``torch.utils.benchmark.Timer``; a block is one batch, or with adaptive TTA one whole cycle of batches
over the photos -- there a batch's cost depends on how many of its photos trigger TTA, and the median
batch is a cheap one: on the AMX Xeon on 2026-12-04 the median batch read ResNet-50's adaptive limit as
32.6 img/s where whole cycles give 29.7-31.4 and the served configuration 27.5); they start together behind a barrier, and every process keeps
working until the last one has finished its measurement, so no measurement sees a half-idle machine.
The limit is the sum of their img/s: served/limit <= 1 then means what it says. ``cores`` is the sum of
the CPU time each process (all its threads) used while measured over the wall time: the limit's CPU per
image, which ``benchmarks.accounting`` sets against the served workers'.

``LimitJob.eager`` runs the same pipeline through eager PyTorch fp32 (the checkpoint's model with the
normalization in front), for ``runtime_gap``: in-process ONNX Runtime fp32 (in ours_fp32's split) / eager fp32 (in stock's split).
``adaptive_threshold`` picks the confidence threshold the adaptive-TTA configuration is served with.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import queue as queue_module
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.configs import BATCH, Split

# What the fork server imports once. Nothing here computes: torch's thread pools start with the first
# parallel op, in the child that sets its own thread count (numpy's OpenBLAS starts a thread at import and
# handles a fork itself); the runtimes (ONNX Runtime, OpenVINO) are imported by each child, as a TorchServe
# worker imports them.
PRELOAD = ("torch", "torchvision", "PIL.Image", "inference.images", "inference.transforms")


def adaptive_threshold(export_dir: Path, spec, payload_dir: Path, quantile: float = 0.25) -> float:
    """Random weights have no meaningful confidence: pick the threshold that sends about a quarter of
    these payloads to TTA, so the cost of adaptive TTA at that trigger rate is what gets measured. The
    confidences are those the server decides on: the plain view of the photos decoded as it decodes them
    (JPEGs reduced in the DCT down to the resize size), not of full-size decodes."""
    from inference.backends import load_backend
    from inference.images import read_image_file
    from inference.transforms import EvalPreset
    paths = sorted(p for p in payload_dir.rglob("*.jpg"))
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    batch = preset.batch([read_image_file(str(p), min_side=preset.min_decode_side) for p in paths])
    conf = load_backend(str(export_dir / "model.onnx"))(batch).softmax(-1).max(1).values
    return float(conf.quantile(quantile))


def block_batches(photos: int, batch: int, *, adaptive: bool) -> int:
    """Batches in one timed block: one, or with adaptive TTA a whole cycle -- the batches until they repeat
    (``photos`` photos taken in turn, ``batch`` at a time), in which every photo comes equally often."""
    return photos // math.gcd(photos, batch) if adaptive else 1


@dataclass(frozen=True)
class LimitJob:
    """What one worker of a configuration runs; ``graph`` (an exported graph) or ``eager`` (a checkpoint)."""
    payloads: tuple[str, ...]          # JPEG files, cycled through as the load generator does
    crop_size: int
    resize_size: int
    graph: str | None = None
    eager: str | None = None           # checkpoint path: eager PyTorch fp32 instead of a graph
    precision: str = "f32"             # OpenVINO inference precision hint (resolved, as the handler does)
    pinning: bool = False              # OpenVINO's ENABLE_CPU_PINNING (the handler's openvino_cpu_pinning)
    tta: str = "none"
    adaptive: bool = False
    threshold: float = 0.9
    max_forward_batch: int = 256       # the handler's chunking of the views
    batch: int = BATCH
    seconds: float = 8.0


def _forward(job: LimitJob, threads: int):
    """The backend as the handler calls it (chunked by ``max_forward_batch``)."""
    if job.eager:
        from export.wrappers import FusedNormalization
        from training.checkpoint import load_checkpoint
        spec, state, _ = load_checkpoint(job.eager)
        net = spec.build().eval()
        net.load_state_dict(state)
        module = FusedNormalization(net, mean=spec.mean, std=spec.std).eval()

        def backend(images):
            with torch.inference_mode():
                return module(images)
    else:
        from inference.backends import load_backend
        backend = load_backend(job.graph, threads=threads, precision=job.precision, pinning=job.pinning)
    step = job.max_forward_batch

    def forward(images):
        if len(images) <= step:
            return backend(images)
        return torch.cat([backend(images[i:i + step]) for i in range(0, len(images), step)])
    return forward


def _one_worker(job: LimitJob, threads: int, barrier, done, processes: int, results) -> None:
    """One process of the limit: load, warm up, wait for the others, measure, keep the load until all are done."""
    counted = False
    try:
        from concurrent.futures import ThreadPoolExecutor

        from inference.images import decode_many, probe
        from inference.tta import adaptive_predict_proba, canvas_preset, predict_proba
        from tools.timing import rate

        torch.set_num_threads(threads)
        forward = _forward(job, threads)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        datas = [Path(p).read_bytes() for p in job.payloads]
        preset = canvas_preset(job.tta, crop_size=job.crop_size, resize_size=job.resize_size)
        at = [0]

        def one_batch():
            chunk = [datas[(at[0] + k) % len(datas)] for k in range(job.batch)]
            at[0] += job.batch
            infos = [probe(d) for d in chunk]  # the handler's admission reads every header first
            canvas = torch.stack(decode_many(chunk, infos=infos, pool=pool, transform=preset,
                                             min_side=preset.min_decode_side))
            if job.adaptive:
                probs, _ = adaptive_predict_proba(forward, canvas, job.tta, crop_size=job.crop_size,
                                                  threshold=job.threshold)
            else:
                probs = predict_proba(forward, canvas, job.tta, crop_size=job.crop_size)
            probs.topk(min(5, probs.shape[1]), dim=1)

        for _ in range(2):
            one_batch()
        barrier.wait(timeout=600)
        cpu0, wall0 = time.process_time(), time.perf_counter()  # all of this process's threads
        n = block_batches(len(datas), job.batch, adaptive=job.adaptive)

        def block():
            for _ in range(n):
                one_batch()
        img_s = rate(block, n * job.batch, min_run_time=job.seconds, threads=threads)
        cores = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        with done.get_lock():
            done.value += 1
        counted = True
        while done.value < processes:  # the others are still measuring: keep the machine as loaded
            one_batch()
        results.put(("ok", (img_s, cores)))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises it
        barrier.abort()
        if not counted:
            with done.get_lock():
                done.value += 1
        results.put(("error", traceback.format_exc()))


def in_process_limit(job: LimitJob, split: Split, *, timeout: float = 900) -> dict:
    """``split.workers`` processes of ``split.threads`` threads running ``job`` at once: ``img_s`` (their
    sum), ``per_process``, ``cores`` (the CPU they used over wall time, summed) and ``per_process_cores``,
    ``processes``, ``threads`` and ``decode_pool`` (threads of each one's pool)."""
    started = time.time()
    ctx = mp.get_context("forkserver")  # not a fork of this process: its other threads' locks stay here
    ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when the fork server first starts
    barrier, done, results = ctx.Barrier(split.workers), ctx.Value("i", 0), ctx.Queue()
    procs = [ctx.Process(target=_one_worker, args=(job, split.threads, barrier, done, split.workers, results),
                         daemon=True) for _ in range(split.workers)]
    for p in procs:
        p.start()
    out, errors = [], []
    try:
        for _ in procs:
            try:
                status, value = results.get(timeout=timeout)
            except queue_module.Empty:
                errors.append(f"no result after {timeout:.0f} s")
                break
            (out if status == "ok" else errors).append(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("in-process limit failed:\n" + "\n".join(errors))
    return {"img_s": sum(x for x, _ in out), "per_process": [x for x, _ in out],
            "cores": sum(c for _, c in out), "per_process_cores": [c for _, c in out],
            "processes": split.workers, "threads": split.threads,
            "decode_pool": split.threads, "batch": job.batch, "tta": job.tta, "adaptive": job.adaptive,
            "runtime": "eager fp32" if job.eager else Path(job.graph).name, "precision": job.precision,
            "pinning": job.pinning, "started": started}
