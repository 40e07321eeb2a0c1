"""GPU smoke check and training-throughput probe (run where CUDA exists; exits early otherwise).

    python -m benchmarks.gpu_smoke [--seconds 2]

1. The handler's pipeline on CUDA equals the CPU pipeline: decode -> upload -> EvalPreset.batch on the
   GPU -> exported TorchScript graph on the GPU -> flip TTA -> top-k, against the same on the CPU, for
   the real photos of ``tools.photos`` (the graph: ``tools.models``' random-initialised cbam_resnet,
   exported by ``export.exporter``).
2. Training throughput of ``cbam_resnet`` (full width, 32 px, batch 256): fp32 vs bf16 autocast, and
   each with channels_last, in images/s (median over ``torch.utils.benchmark.Timer`` blocks).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from inference.backends import load_backend
from inference.images import decode_rgb
from inference.transforms import EvalPreset
from inference.tta import predict_proba
from tools.models import export_random_model
from tools.photos import photo_jpegs
from tools.timing import rate
from training.models import build_model

BATCH = 256


def pipeline_parity() -> None:
    preset = EvalPreset(crop_size=32, resize_size=36)
    payloads = [data for _, data in photo_jpegs()]
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_random_model("cbam_resnet", Path(tmp), variants=["torchscript"])
        manifest = json.loads((exported.export_dir / "export.json").read_text())
        path = str(exported.export_dir / manifest["variants"]["torchscript"]["files"][0])
        results = {}
        for dev in ("cpu", "cuda"):
            device = torch.device(dev)
            backend = load_backend(path, device=device)
            images = [decode_rgb(p).to(device) for p in payloads]
            batch = preset.batch(images)
            probs = predict_proba(backend, batch, "flip").cpu()
            results[dev] = (batch.cpu(), probs)
    (b_cpu, p_cpu), (b_gpu, p_gpu) = results["cpu"], results["cuda"]
    pix = (b_cpu.int() - b_gpu.int()).abs().max().item()
    print(f"pipeline cpu vs cuda on {len(payloads)} photos: max pixel difference after resize {pix}, max prob "
          f"difference {(p_cpu - p_gpu).abs().max().item():.2e}, top-1 agreement "
          f"{(p_cpu.argmax(1) == p_gpu.argmax(1)).float().mean().item():.3f}")


def train_throughput(seconds: float) -> None:
    device = torch.device("cuda")
    for amp in (None, torch.bfloat16):
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = build_model("cbam_resnet", num_classes=10).to(device)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=fmt)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(BATCH, 3, 32, 32, device=device).to(memory_format=fmt)
            y = torch.randint(0, 10, (BATCH,), device=device)

            def step():
                with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            images_per_s = rate(step, BATCH, min_run_time=seconds)
            print(f"train cbam_resnet 32px batch {BATCH} {'bf16' if amp else 'fp32'}"
                  f"{' channels_last' if channels_last else ''}: {images_per_s:,.0f} img/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0,
                   help="at least this many seconds of timed training steps per configuration")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    pipeline_parity()
    train_throughput(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
