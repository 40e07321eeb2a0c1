"""TorchServe end to end on a GPU: the stock handler against ours, over HTTP under locust, on 500x375
and 12 MP photos.

    python -m benchmarks.gpu_serve [--configs stock,ours_fp32,ours_fp16,ours_fp16_flip]
        [--sets jpeg500,phone12mp] [--split 4x4] [--batch 16] [--users 64] [--seconds 15]
        [--locust-processes 4] [--model resnet50] [--json PATH]

What only a GPU shows: a real TorchServe (Java frontend, Python workers, each given the GPU by
TorchServe's own GPU assignment) serving ResNet-50 with 100 classes (random weights, seed 0: the
model of ``make bench``) to locust's closed-loop users. ``stock`` is TorchServe's built-in
``image_classifier`` (PIL decode and torchvision transforms image by image on the CPU, eager fp32 on
the GPU); ``ours_*`` is this project's handler with the exported TorchScript graph (fp32 or fp16,
uint8 in, normalization inside): every complete JPEG of a batch decoded by nvjpeg in ONE call at full
size, resized and cropped on the GPU, TTA views in one forward. Every configuration serves the same
workers x threads split and batch; ours runs with the handler's default budgets, which on a GPU admit a
full batch of phone photos (``inference.admission.batch_pixel_budget``: batch x 24 MP where nvjpeg decodes
JPEGs at full size).

Printed: img/s (answered without failure), p50/p99, failures, the GPU's mean utilization while the
run lasted (NVML, where ``pynvml`` is installed), locust's CPU seconds (a locust process near one CPU
second per second is the bottleneck: raise ``--locust-processes``), and the ratios ours/stock per set
and 500x375 / 12 MP per configuration.

Without a GPU it runs the same on the CPU (ours then decodes JPEGs reduced in the DCT domain): the
tests serve ``--model smoke`` that way.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.configs import Config, Split, parse_grid
from benchmarks.served import Served, build_archive_for
from inference.atomic import write_json
from inference.cli import UsageError
from inference.cli import run as run_cli
from tools.models import MODELS, export_random_model
from tools.photos import SETS, write_photos

VARIANTS = {"ours_fp32": ("torchscript", "none"), "ours_fp16": ("torchscript-fp16", "none"),
            "ours_fp16_flip": ("torchscript-fp16", "flip"), "ours_onnx": ("onnx", "none")}
CONFIG_NAMES = ("stock", *VARIANTS)
DEFAULTS = dict(configs="stock,ours_fp32,ours_fp16,ours_fp16_flip", sets="jpeg500,phone12mp", split="4x4", batch=16,
                users=64, seconds=15, locust_processes=4, model="resnet50")


def configs(names: list[str]) -> list[Config]:
    """The configurations named, with the handler's default settings (the budgets included)."""
    out = []
    for name in names:
        if name == "stock":
            out.append(Config("stock", "stock", variant="eager"))
        else:
            variant, tta = VARIANTS[name]
            out.append(Config(name, "ours", variant, tta=tta))
    return out


class GpuSampler:
    """The GPU's utilization (%) and memory in use (MiB), sampled every ``interval`` s while running (NVML)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (no GPU, or nvidia-ml-py not installed): nothing is sampled
            self._nvml = None

    def __enter__(self) -> "GpuSampler":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append((util.gpu, mem.used / 2**20))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_util_pct": None, "gpu_mem_mib": None}
        return {"gpu_util_pct": round(statistics.mean(u for u, _ in self.samples), 1),
                "gpu_mem_mib": round(max(m for _, m in self.samples))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=DEFAULTS["configs"], help=f"comma-separated, of: {', '.join(CONFIG_NAMES)}")
    p.add_argument("--sets", default=DEFAULTS["sets"], help=f"payload sets (tools.photos), of: {', '.join(SETS)}")
    p.add_argument("--split", default=DEFAULTS["split"], help="WORKERSxTHREADS of every configuration")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="TorchServe batchSize")
    p.add_argument("--max-batch-delay", type=int, default=10, help="TorchServe maxBatchDelay, ms")
    p.add_argument("--users", type=int, default=DEFAULTS["users"], help="locust users (closed loop)")
    p.add_argument("--seconds", type=int, default=DEFAULTS["seconds"], help="seconds per load run")
    p.add_argument("--locust-processes", type=int, default=DEFAULTS["locust_processes"],
                   help="locust load processes (its --processes)")
    p.add_argument("--model", default=DEFAULTS["model"], choices=sorted(MODELS),
                   help="the random-weight model (stock needs resnet50)")
    p.add_argument("--photos", type=int, default=None, help="use only the first N photos of each set after jpeg500")
    p.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--json", default=None, help="write every result here")
    args = p.parse_args(argv)
    args.config_names = [n.strip() for n in args.configs.split(",") if n.strip()]
    args.set_names = [n.strip() for n in args.sets.split(",") if n.strip()]
    bad = [n for n in args.config_names if n not in CONFIG_NAMES] + [n for n in args.set_names if n not in SETS]
    if bad or not args.config_names or not args.set_names:
        raise UsageError(f"unknown or no configurations/sets {bad}: configurations {', '.join(CONFIG_NAMES)}; "
                         f"sets {', '.join(SETS)}")
    if "stock" in args.config_names and args.model != "resnet50":
        raise UsageError("stock serves torchvision's ResNet-50 only: --model resnet50, or leave stock out")
    try:
        (args.split_obj,) = parse_grid(args.split)
    except ValueError as e:
        raise UsageError(f"--split: {e}") from None
    for name in ("batch", "users", "seconds", "locust_processes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.photos is not None and args.photos < 1:
        raise UsageError(f"--photos must be >= 1, got {args.photos}")
    if args.json and not Path(args.json).resolve().parent.is_dir():  # found now, not after every run
        raise UsageError(f"--json {args.json}: its folder does not exist")
    return args


def ratios(results: list[dict]) -> dict:
    """ours/stock per set (each of ours) and 500x375 / 12 MP per configuration, from img/s."""
    rate = {(r["config"], r["set"]): r["img_s"] for r in results}
    out = {}
    for (name, set_name), v in rate.items():
        stock = rate.get(("stock", set_name))
        if name != "stock" and stock:
            out[f"{name}/stock_{set_name}"] = round(v / stock, 2)
        if set_name == "jpeg500" and rate.get((name, "phone12mp")):
            out[f"{name}_small/12mp"] = round(v / rate[(name, "phone12mp")], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    split: Split = args.split_obj
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-serve-")).resolve()  # locust runs from the repository root
    work.mkdir(parents=True, exist_ok=True)
    print(f"device: {device}; torch {torch.__version__}; {args.model}; split {split}, batch {args.batch}, "
          f"{args.users} users, {args.seconds} s a run; work {work}", flush=True)
    payloads = write_photos(work / "payloads", tuple(args.set_names), limit=args.photos).parent
    chosen = configs(args.config_names)
    variants = sorted({c.variant for c in chosen if c.kind == "ours"})
    t0 = time.time()
    prep = export_random_model(args.model, work, variants=variants or ["torchscript"])  # stock: the state dict
    print(f"exported {', '.join(variants)} in {time.time() - t0:.0f} s", flush=True)
    results = []
    for c in chosen:
        store = work / "store" / c.name
        name = build_archive_for(c, split, prep, store, threshold=0.0, batch=args.batch,
                                 max_batch_delay=args.max_batch_delay)
        served = Served(c, split, store=store, name=name, work=work, label=device,
                        locust_processes=args.locust_processes)
        t0 = time.time()
        served.start()
        print(f"{c.name}: TorchServe ready in {time.time() - t0:.0f} s", flush=True)
        try:
            for set_name in args.set_names:
                with GpuSampler() as gpu:
                    r = served.run(payloads / set_name, args.users, args.seconds, tag=f"{c.name}-{set_name}",
                                   quiet=True, set=set_name, config=c.name)
                r.update(gpu.summary())
                results.append(r)
                print(f"{c.name:<15} {set_name:<10} {r['img_s']:8.1f} img/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
                      f"  failures {r['failures']}/{r['requests']}  gpu {r['gpu_util_pct']}% {r['gpu_mem_mib']} MiB"
                      f"  cpu: server {r['server_cpu_s']:.0f} s, locust {r['locust_cpu_s']:.0f} s", flush=True)
        finally:
            served.stop()
    summary = ratios(results)
    print("ratios: " + " ".join(f"{k}={v}" for k, v in summary.items()))
    if args.json:
        write_json(path=args.json, obj={"device": device, "torch": torch.__version__, "model": args.model,
                                        "split": str(split), "batch": args.batch, "users": args.users,
                                        "seconds": args.seconds, "cpus": os.cpu_count(), "results": results,
                                        "ratios": summary})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
