"""Speed of the exported variants on a GPU: images/s at several batch sizes, per variant.

    python -m benchmarks.gpu_export --dir EXPORT_DIR [--batches 1,64,256]

Complements ``python -m export verify`` (parity and accuracy): this measures throughput of each
graph in an export folder on CUDA (TorchScript on the device; ONNX through ONNX Runtime's CUDA EP).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks.configs import positive_ints
from export.manifest import load_manifest
from inference.backends import load_backend
from inference.cli import run as run_cli
from tools.timing import rate


def throughput(backend, size: int, batch: int, *, seconds: float = 1.0) -> float:
    """Images per second of the forward at ``batch``: median over Timer blocks (at least ``seconds`` of
    them), each block synchronized with the device at its end, so queued GPU work is counted."""
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    if backend.name == "torchscript":
        x = x.cuda()
    return rate(lambda: backend(x), batch, min_run_time=seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="export folder")
    p.add_argument("--batches", default="1,64,256", help="batch sizes")
    args = p.parse_args()
    batches = positive_ints(args.batches, "--batches")  # options checked before any GPU work
    manifest = load_manifest(args.dir)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; model {manifest['arch']} "
          f"{manifest['model_kwargs']} at {manifest['input_size']} px")
    print(f"{'variant':<18} {'providers':<28} " + " ".join(f"{'b=' + str(b):>10}" for b in batches) + "  (images/s)")
    for name, info in manifest["variants"].items():
        if info["runtime"] == "openvino":
            continue
        backend = load_backend(os.path.join(args.dir, info["files"][0]), device=torch.device("cuda"))
        rates = [throughput(backend, info["input_size"], b) for b in batches]
        print(f"{name:<18} {str(backend.providers[0])[:28]:<28} " + " ".join(f"{r:>10,.0f}" for r in rates))
    return 0


if __name__ == "__main__":  # a mistake: one line, exit status 2
    sys.exit(run_cli(main, expected=(ValueError,)))
