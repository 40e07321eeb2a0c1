"""GPU smoke check and training-throughput probe (run where CUDA exists; exits early otherwise).

    python -m benchmarks.gpu_smoke [--steps 30]

1. The handler's pipeline on CUDA equals the CPU pipeline: decode -> upload -> EvalPreset.batch on the
   GPU -> exported TorchScript graph on the GPU -> flip TTA -> top-k, against the same on the CPU.
2. Training throughput of ``cbam_resnet`` (full width, 32 px, batch 256): fp32 vs bf16 autocast, and
   each with channels_last, in images/s.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from export.formats import export_torchscript
from export.wrappers import FusedNormalization
from handlers.backends import load_backend
from training.images import decode_rgb
from training.models import build_model
from training.presets import EvalPreset
from training.tta import predict_proba


def _jpeg(seed: int, size=(375, 500)) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((*size, 3)) * 40 + np.linspace(0, 200, size[1])[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pipeline_parity() -> None:
    torch.manual_seed(0)
    model = build_model("cbam_resnet", num_classes=10).eval()
    wrapper = FusedNormalization(model, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    preset = EvalPreset(crop_size=32, resize_size=36)
    payloads = [_jpeg(i) for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        export_torchscript(wrapper, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), path)
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
    print(f"pipeline cpu vs cuda: max pixel difference after resize {pix}, max prob difference "
          f"{(p_cpu - p_gpu).abs().max().item():.2e}, top-1 agreement "
          f"{(p_cpu.argmax(1) == p_gpu.argmax(1)).float().mean().item():.3f}")


def train_throughput(steps: int) -> None:
    device = torch.device("cuda")
    for amp in (None, torch.bfloat16):
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = build_model("cbam_resnet", num_classes=10).to(device)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=fmt)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(256, 3, 32, 32, device=device).to(memory_format=fmt)
            y = torch.randint(0, 10, (256,), device=device)
            for i in range(steps + 5):
                if i == 5:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            torch.cuda.synchronize()
            rate = 256 * steps / (time.perf_counter() - start)
            print(f"train cbam_resnet 32px batch 256 {'bf16' if amp else 'fp32'}"
                  f"{' channels_last' if channels_last else ''}: {rate:,.0f} img/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed training steps per configuration")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    pipeline_parity()
    train_throughput(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
