"""``python -m export --checkpoint CKPT --out DIR`` and ``python -m export archive --dir DIR ...``."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from datetime import datetime, timezone

import torch

FORMATS = ("torchscript", "onnx")


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Export a training checkpoint into graphs that take uint8 NCHW images (input 'images', "
        "N x 3 x S x S at the model's input size) and normalize inside the graph: /255, -mean, /std are "
        "folded into one per-channel multiply-add. TorchScript is traced and frozen (the freezer folds "
        "BatchNorm into the convolutions); ONNX has a dynamic batch axis and passes onnx.checker. Every "
        "graph is checked against the eager model on real images and the numbers go into DIR/export.json. "
        "Build archives afterwards with `python -m export archive --help`.")
    p.add_argument("--checkpoint", required=True, help="best.pt/last.pt written by `python -m training train`")
    p.add_argument("--out", required=True, help="output folder for model.pt / model.onnx / index_to_name.json / export.json")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of: {', '.join(FORMATS)}")
    p.add_argument("--data", default=None, help="ImageFolder tree of real images for the parity check "
                   "(default: random uint8 images, which only prove numerical parity)")
    p.add_argument("--parity-images", type=int, default=64, help="images used by the parity check")
    return p


def _archive_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export archive", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Build MODEL_STORE/NAME.mar with torch-model-archiver from an export folder: the graph, the "
        "handler and its helper modules, index_to_name.json, model_card.json and model-config.yaml. The archive "
        "is self-contained: a stock TorchServe with torch/torchvision (and onnxruntime for ONNX) serves it.")
    p.add_argument("--dir", required=True, help="export folder written by `python -m export`")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="which graph to serve: onnx -> ONNX Runtime, "
                   "torchscript -> TorchScript")
    p.add_argument("--name", required=True, help="model name: the URL is /predictions/NAME")
    p.add_argument("--version", default="1.0", help="model version for TorchServe's versioned management API")
    p.add_argument("--model-store", default="model_store", help="folder the archive is written to")
    p.add_argument("--archive-format", default="default", choices=["default", "no-archive"],
                   help="default: a zip .mar; no-archive: a plain folder, for development")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (dynamic server-side batching)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="TorchServe maxBatchDelay in ms")
    p.add_argument("--workers", type=int, default=1, help="minWorkers = maxWorkers")
    p.add_argument("--response-timeout", type=int, default=60, help="TorchServe responseTimeout in s")
    p.add_argument("--topk", type=int, default=5, help="classes returned per image (clients may send X-Top-K)")
    p.add_argument("--tta", default="flip", choices=["none", "flip"], help="test-time augmentation in the handler")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="larger images are refused with 413")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per worker (0: cores / workers)")
    return p


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_export(args: argparse.Namespace) -> dict:
    from training.checkpoint import load_checkpoint, load_model
    from training.class_index import INDEX_FILE, write_index_to_name
    from .archive import EXPORT_MANIFEST, FORMAT_FILES
    from .formats import WRITERS
    from .verify import check, compare, format_table, sample_images
    from .wrappers import FusedNormalization

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise SystemExit(f"--formats: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}")
    spec, model = load_model(args.checkpoint)
    _, _, ckpt = load_checkpoint(args.checkpoint)
    os.makedirs(args.out, exist_ok=True)
    wrapper = FusedNormalization(model, mean=spec.mean, std=spec.std).eval()
    example = torch.randint(0, 256, (2, 3, spec.input_size, spec.input_size), dtype=torch.uint8)
    files = {}
    for fmt in formats:
        writer, filename = WRITERS[fmt]
        path = os.path.join(args.out, filename)
        writer(wrapper, example, path)
        files[fmt] = path
        print(f"wrote {path}")
    write_index_to_name(os.path.join(args.out, INDEX_FILE), spec.class_names)
    if args.data:
        images = sample_images(args.data, spec, count=args.parity_images)
    else:
        images = torch.randint(0, 256, (args.parity_images, 3, spec.input_size, spec.input_size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
    parity = compare(model, spec, files, images)
    print(f"parity against eager fp32 on {len(images)} {'real' if args.data else 'random'} images:")
    print(format_table(parity))
    check(parity)
    manifest = {
        "arch": spec.arch, "model_kwargs": spec.model_kwargs, "class_names": spec.class_names,
        "input_size": spec.input_size, "resize_size": spec.resize_size, "mean": list(spec.mean), "std": list(spec.std),
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, spec.input_size, spec.input_size]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", spec.num_classes]},
        "files": {fmt: FORMAT_FILES[fmt] for fmt in formats}, "parity": parity,
        "training_metrics": ckpt.get("metrics", {}), "checkpoint_sha256": _sha256(args.checkpoint),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(args.out, EXPORT_MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def run_archive(args: argparse.Namespace):
    from .archive import build_archive

    path = build_archive(args.dir, fmt=args.format, name=args.name, version=args.version,
                         model_store=args.model_store, archive_format=args.archive_format,
                         batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay, workers=args.workers,
                         response_timeout_s=args.response_timeout, topk=args.topk, tta=args.tta,
                         max_pixels=args.max_pixels, threads=args.threads)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "archive":
        run_archive(_archive_parser().parse_args(argv[1:]))
    else:
        run_export(_export_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
