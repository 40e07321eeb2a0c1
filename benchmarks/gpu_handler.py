"""The handler's whole pipeline on a GPU, in-process, against forward-only on pre-decoded tensors.

    python -m benchmarks.gpu_handler [--batches 1,8,64,256] [--tta none,flip] [--dtype fp16] [--sets jpeg500]

Model: torchvision ResNet-50 with 100 classes (random weights, seed 0: the stock baseline's model),
wrapped with the fused uint8 normalization, traced and frozen in fp16/bf16 on the GPU. Payloads: the
real photos of ``tools.photos`` (shipped in installed packages), re-encoded as JPEG q90: 500x375
(``jpeg500``), 12 MP phone photos (``phone12mp``) or mixed sizes (``mixed``).
Times are medians of ``torch.utils.benchmark.Timer`` blocks (``tools.timing``).

For each batch size B, the handler (TorchServe's Context, real request rows) runs preprocess
(batched nvjpeg decode -> resize 256 / crop 224 on the GPU) -> inference (TTA views, ONE forward) ->
postprocess (top-5 JSON); "forward only" runs the same forward on the already-decoded views. The
ratio pipeline/forward is the share of the GPU's model throughput that serving keeps. For each set,
one more line compares the decode stage of the two paths a JPEG can take, per image: nvjpeg at full
size in one batched call, then resize/crop on the GPU (what the handler does on a GPU), against the
CPU path (DCT-reduced libjpeg-turbo decode, then resize/crop: what it does on a CPU) on one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from benchmarks.configs import positive_ints
from export.archive import model_config
from export.wrappers import FusedNormalization
from inference.class_index import write_index_to_name
from inference.cli import UsageError
from inference.cli import run as run_cli
from inference.tta import TTA_MODES
from tools.photos import SETS, photo_jpegs
from tools.timing import seconds_per_call


def build_model_dir(dtype: torch.dtype, workdir: str) -> str:
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=100).eval()
    wrapper = FusedNormalization(model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), dtype=dtype).cuda().eval()
    example = torch.zeros(2, 3, 224, 224, dtype=torch.uint8, device="cuda")
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(wrapper, example, check_trace=False))
    torch.jit.save(traced, os.path.join(workdir, "model.pt"))
    write_index_to_name(os.path.join(workdir, "index_to_name.json"), [f"class_{i}" for i in range(100)])
    return workdir


def make_handler(model_dir: str, *, tta: str, batch: int):
    from ts.context import Context

    from handlers.classifier_handler import ImageClassifierHandler
    cfg = model_config(input_size=224, resize_size=256, tta=tta, topk=5, batch_size=batch, max_forward_batch=4096)
    manifest = {"model": {"modelName": "resnet50", "modelVersion": "1.0", "serializedFile": "model.pt"}}
    ctx = Context("resnet50", model_dir, manifest, batch, 0, "0.12.0", model_yaml_config=cfg)
    handler = ImageClassifierHandler()
    handler.initialize(ctx)
    return handler, ctx


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--tta", default="none,flip")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--sets", default="jpeg500", help="payload sets of tools.photos: jpeg500, phone12mp, mixed")
    args = p.parse_args()
    args.batch_sizes = positive_ints(args.batches, "--batches")  # options checked before any GPU work
    bad = [t for t in args.tta.split(",") if t not in TTA_MODES] + [s for s in args.sets.split(",") if s not in SETS]
    if bad:
        raise UsageError(f"unknown --tta/--sets {bad}: TTA modes {', '.join(TTA_MODES)}; sets {', '.join(SETS)}")
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; ResNet-50 (100 classes) {args.dtype}")
    print(f"{'set':<10} {'tta':<6} {'batch':>5} {'pipeline img/s':>15} {'forward-only img/s':>19} {'ratio':>6} "
          f"{'decode ms':>10} {'preprocess ms':>14} {'forward ms':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(dtype, tmp)
        for set_name in args.sets.split(","):
            payloads = [data for _, data in photo_jpegs(set_name)]
            run_set(model_dir, set_name, payloads, args)
    return 0


def decode_paths(payloads: list[bytes], batch: int) -> tuple[float, float]:
    """ms per image of the GPU path (nvjpeg, batch of ``batch``, full size, resize/crop on the GPU) and of the CPU
    path (DCT-reduced decode, resize/crop, one thread), to the 256/224 canvas."""
    from inference.images import batch_jpeg_decoder, decode_many
    from inference.transforms import EvalPreset
    preset = EvalPreset(crop_size=224, resize_size=256)
    datas = [payloads[i % len(payloads)] for i in range(batch)]

    def gpu():
        out = decode_many(datas, device=torch.device("cuda"), transform=preset,
                          jpeg_batch_decoder=batch_jpeg_decoder("cuda"))
        torch.cuda.synchronize()
        return out

    cpu = lambda: decode_many(datas, transform=preset, min_side=preset.min_decode_side)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return seconds_per_call(gpu) * 1000 / batch, seconds_per_call(cpu) * 1000 / batch
    finally:
        torch.set_num_threads(threads)


def run_set(model_dir: str, set_name: str, payloads: list[bytes], args) -> None:
    from ts.context import RequestProcessor

    from inference.tta import tta_views
    for tta in args.tta.split(","):
        for b in args.batch_sizes:
            handler, ctx = make_handler(model_dir, tta=tta, batch=b)
            rows = [{"body": bytearray(payloads[i % len(payloads)])} for i in range(b)]
            ctx.request_processor = [RequestProcessor({}) for _ in range(b)]
            handler.context = ctx
            last = {}

            def pipeline():
                batch = handler.inference(handler.preprocess(rows))
                out = handler.postprocess(batch)
                last["timings"], last["out"] = batch.timings, out

            t_pipe = seconds_per_call(pipeline)
            refused = [(i, ctx.get_response_status(i)) for i in range(b) if ctx.get_response_status(i)[0] != 200]
            if refused:  # every image counted must have been answered, not refused by a budget
                i, status = refused[0]
                raise SystemExit(f"{set_name} batch {b}: {len(refused)} of {b} requests not answered with 200, "
                                 f"e.g. request {i}: {status} {last['out'][i][:200]}")
            assert all(len(json.loads(out)["predictions"]) == 5 for out in last["out"])
            canvas = handler.preprocess(rows).canvas
            assert len(canvas) == b, (len(canvas), b)
            views = tta_views(canvas, tta, crop_size=224)
            t_fwd = seconds_per_call(lambda: handler.forward(views))
            tm = last["timings"]
            print(f"{set_name:<10} {tta:<6} {b:>5} {b / t_pipe:>15,.0f} {b / t_fwd:>19,.0f} {t_fwd / t_pipe:>6.2f} "
                  f"{tm['decode']:>10.2f} {tm['preprocess']:>14.2f} {tm['forward']:>11.2f}", flush=True)
    b = max(args.batch_sizes)
    gpu_ms, cpu_ms = decode_paths(payloads, b)
    print(f"{set_name:<10} decode to the 224 canvas, ms per image: nvjpeg full size (batch {b}) + GPU resize "
          f"{gpu_ms:.2f}; CPU DCT-reduced + resize, 1 thread {cpu_ms:.2f}", flush=True)


if __name__ == "__main__":  # a mistake: one line, exit status 2
    sys.exit(run_cli(main))
