"""``python -m training {prepare-fashion-mnist,train,evaluate}``."""
from __future__ import annotations

import argparse
import json
import sys

from .models import list_models


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate attention ResNet classifiers "
                                "on ImageFolder trees (DIR/<class>/<image>).")
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-fashion-mnist", help="write the embedded Fashion-MNIST as an ImageFolder tree",
                          description="Write Fashion-MNIST (Debian package dataset-fashion-mnist) as "
                          "OUT/train/<class>/*.png and OUT/test/<class>/*.png. Skips splits already written.")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX .gz files")

    t = sub.add_parser("train", help="train a model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train on DATA/train, evaluate on DATA/test (or DATA/val) every epoch; write "
                       "OUT/best.pt (best test top-1), OUT/last.pt and OUT/log.csv.")
    t.add_argument("--data", required=True, help="ImageFolder root holding train/ and test/ (or val/)")
    t.add_argument("--arch", default="cbam_resnet", choices=list_models(), help="architecture")
    t.add_argument("--model-kwargs", default="{}", type=json.loads,
                   help='JSON keyword arguments of the architecture, e.g. \'{"widths": [16, 32, 64, 128], "head_width": 256}\'')
    t.add_argument("--epochs", type=int, default=10, help="number of epochs")
    t.add_argument("--batch-size", type=int, default=128, help="images per step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine schedule after warm-up)")
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    t.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    t.add_argument("--warmup-epochs", type=float, default=0.2, help="linear warm-up length in epochs")
    t.add_argument("--input-size", type=int, default=32, help="model input size (center crop), pixels")
    t.add_argument("--resize-size", type=int, default=None, help="shorter side before the crop (default: input size)")
    t.add_argument("--normalize", default="dataset", choices=["dataset", "imagenet"],
                   help="mean/std: computed on the training images, or ImageNet's")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--no-cache", dest="cache", action="store_false",
                   help="decode images on every access instead of once into memory")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, none on CPU")
    t.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Print top-1/top-5 of CHECKPOINT on an ImageFolder tree and write per-image "
                       "predictions as CSV.")
    e.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train")
    e.add_argument("--data", required=True, help="ImageFolder tree to evaluate on, e.g. DATA/test")
    e.add_argument("--tta", default="none", choices=["none", "flip", "five_crop", "ten_crop", "multi_scale"],
                   help="test-time augmentation, exactly as the handler does it (see training/tta.py)")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward")
    e.add_argument("--out", default=None, help="CSV of per-image predictions (default: next to the checkpoint)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "prepare-fashion-mnist":
        from .data import prepare_fashion_mnist
        print(f"Fashion-MNIST written to {prepare_fashion_mnist(args.out, source=args.source)}")
    elif args.command == "train":
        from .engine import TrainConfig, train
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"})
        best = train(cfg)
        print(f"best epoch {best['epoch']}: test top-1 {best['test_top1']:.2%} -> {cfg.out}/best.pt")
    elif args.command == "evaluate":
        import os
        from .engine import evaluate
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "predictions.csv")
        r = evaluate(args.checkpoint, args.data, tta=args.tta, batch_size=args.batch_size, out_csv=out,
                     device=args.device)
        print(f"top-1 {r['top1']:.2%}  top-5 {r['top5']:.2%}  on {r['images']} images (tta={r['tta']}); "
              f"predictions: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
