"""``python -m training {prepare-fashion-mnist,split,stats,train,evaluate,predict,explain}``.

Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m training train ...`` (DDP).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

from inference.cli import positive_int
from inference.cli import run as run_cli
from inference.tta import TTA_MODES

from .config import TrainConfig
from .evaluation import EVAL_FORMAT_CHOICES, evaluate, predict_folder
from .explain import explain_image
from .fashion_mnist import FASHION_MNIST_DIR
from .formats import AUTO, FORMAT_CHOICES
from .models import list_models
from .split import add_arguments as split_arguments


def default(fn, name: str):
    """``fn``'s default for its keyword ``name``: the one definition a command's option shows and uses."""
    return inspect.signature(fn).parameters[name].default


def _parser() -> argparse.ArgumentParser:
    from .config import add_arguments

    p = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate attention ResNet/ResNeXt "
                                "classifiers on ImageFolder trees, iNaturalist-style JSON or CIFAR pickles.")
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-fashion-mnist", help="write the embedded Fashion-MNIST as an ImageFolder tree",
                          description="Write Fashion-MNIST (Debian package dataset-fashion-mnist) as "
                          "OUT/train/<class>/*.png and OUT/test/<class>/*.png. Skips splits already written.")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--source", default=FASHION_MNIST_DIR, help="folder of the IDX .gz files")

    sp = sub.add_parser("split", help="split a folder of labelled images into train/val/test",
                        description="Split IMAGES/<class>/<image files> into OUT/train/<class>/, OUT/val/<class>/ "
                        "and OUT/test/<class>/ (what train --data OUT reads): stratified by class, seeded, copies or "
                        "symlinks, written into a hidden folder next to OUT and renamed onto it at the end. Prints "
                        "the counts per class and split.")
    split_arguments(sp)

    st = sub.add_parser("stats", help="per-channel mean/std of a data set's training images",
                        description="Compute the channel mean/std (0..1 scale) of every image of the training "
                        "folder after the evaluation resize/crop; pass the result to train --normalize "
                        "M1,M2,M3,S1,S2,S3. train computes its own with the default --normalize dataset, over at "
                        "most 5000 of its training images (the validation images it carves out left out), so the "
                        "two differ a little; give the same --input-size/--resize-size as train (the photo "
                        "preset's are 224/256).")
    st.add_argument("--data", required=True, help="data set root (as for train)")
    st.add_argument("--format", default=AUTO, choices=FORMAT_CHOICES, help="data format")
    st.add_argument("--input-size", type=positive_int, default=TrainConfig.input_size,
                    help="crop size (as for train; default: %(default)s)")
    st.add_argument("--resize-size", type=positive_int, default=None, help="resize size (as for train)")
    st.add_argument("--max-images", type=positive_int, default=None, help="use at most this many images (default: all)")

    t = sub.add_parser("train", help="train a model",
                       description="Train on the training split and evaluate on the validation split every epoch "
                       "(DATA/val next to DATA/test, else --val-fraction of the training images); write "
                       "OUT/best.pt (best validation top-1), OUT/last.pt (exactly resumable), OUT/config.yaml and "
                       "OUT/log.csv (validation numbers). The test split is read once, at the end, to evaluate "
                       "best.pt: OUT/test_metrics.json. Unreadable training images are skipped and counted "
                       "(--max-bad-images). Architectures: " + ", ".join(list_models()) + ". Under torchrun every "
                       "process trains on its share of each batch (DDP); rank 0 logs, evaluates and saves.")
    add_arguments(t)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint: metrics.json, predictions.csv, plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Top-1/3/5, macro precision/recall/F1, per-class accuracy, a classification "
                       "report and a confusion matrix of CHECKPOINT on a labelled ImageFolder tree. Writes "
                       "OUT/metrics.json, OUT/predictions.csv, OUT/confusion_matrix.png (up to 1000 classes), "
                       "OUT/per_class_accuracy.png, OUT/calibration.png (reliability diagram; ECE and NLL in metrics.json) "
                       "and, when the run's log.csv sits next to the checkpoint, OUT/training_curves.png.")
    e.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train")
    e.add_argument("--data", required=True, help="labelled images: class folders (e.g. DATA/test), or a data-set "
                   "root as for train (its test/val split)")
    e.add_argument("--format", default=AUTO, choices=EVAL_FORMAT_CHOICES,
                   help="how to read --data (auto: a data-set root if it is one, else class folders)")
    from inference.settings import HandlerSettings
    served = (f"; an archive serves tta {HandlerSettings.tta} by default (model-config.yaml tta): pass it to score what "
              "the server answers")
    e.add_argument("--tta", default=default(evaluate, "tta"), choices=TTA_MODES,
                   help="test-time augmentation, as the handler does it (inference/tta.py)" + served)
    e.add_argument("--batch-size", type=positive_int, default=default(evaluate, "batch_size"), help="images per forward")
    e.add_argument("--out", default=None, help="output folder (default: eval/ next to the checkpoint)")
    e.add_argument("--device", default=default(evaluate, "device"), help="auto, cpu, cuda, ...")

    pr = sub.add_parser("predict", help="predict the classes of an image file or an unlabelled image folder",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Classify IMAGES (one image file, or every image under a folder, recursively) and write one CSV row per "
                        "image: path, predicted class, confidence (and the top-k with --topk).")
    pr.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train")
    pr.add_argument("--images", required=True, help="an image file, or a folder of images (any layout)")
    pr.add_argument("--out", required=True, help="CSV file to write")
    pr.add_argument("--tta", default=default(predict_folder, "tta"), choices=TTA_MODES,
                    help="test-time augmentation, as the handler does it (inference/tta.py)" + served)
    pr.add_argument("--topk", type=positive_int, default=default(predict_folder, "topk"),
                    help="classes per image in the CSV")
    pr.add_argument("--batch-size", type=positive_int, default=default(predict_folder, "batch_size"),
                    help="images per forward")
    pr.add_argument("--device", default=default(predict_folder, "device"), help="auto, cpu, cuda, ...")

    from inference.explain import FILLS, MAX_GRID
    ex = sub.add_parser("explain", help="write the occlusion heatmap of one image's top-1 class as a PNG",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Occlusion sensitivity of the top-1 class, as the server's /explanations "
                        "computes it (inference/explain.py), on the eager model: the image at the model's input "
                        "(evaluation resize + center crop) under its heatmap, written to OUT.")
    ex.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train")
    ex.add_argument("--image", required=True, help="the image file to explain")
    ex.add_argument("--out", required=True, help="the PNG to write")
    ex.add_argument("--grid", type=int, default=HandlerSettings.explain_grid,
                    help=f"cells per side of the occlusion grid, 1 to {MAX_GRID}")
    ex.add_argument("--fill", default=HandlerSettings.explain_fill, choices=FILLS, help="what hides a cell")
    ex.add_argument("--views-per-forward", type=int, default=HandlerSettings.explain_views_per_forward,
                    help="occluded views per forward")
    ex.add_argument("--device", default=default(explain_image, "device"), help="auto, cpu, cuda, ...")
    return p


def _prepare_fashion_mnist(args) -> None:
    from .fashion_mnist import prepare_fashion_mnist
    print(f"Fashion-MNIST written to {prepare_fashion_mnist(args.out, source=args.source)}")


def _split(args) -> int:
    from .split import run as run_split
    return run_split(args)


def _stats(args) -> None:
    from inference.transforms import EvalPreset

    from .datasets import ReadableImages, unreadable_line
    from .formats import build_datasets
    from .stats import dataset_stats
    preset = EvalPreset(crop_size=args.input_size, resize_size=args.resize_size)
    train_ds, _ = build_datasets(args.data, format=args.format, train_transform=preset)
    bad: list[tuple[str, str]] = []  # unreadable files: skipped and named, as train skips them
    mean, std = dataset_stats(ReadableImages(train_ds), max_images=args.max_images, bad=bad)
    for path, reason in bad:
        print(unreadable_line(path, reason), file=sys.stderr)
    read = len(train_ds) if args.max_images is None else min(len(train_ds), args.max_images)
    print(json.dumps({"mean": [round(v, 4) for v in mean], "std": [round(v, 4) for v in std],
                      "images": read - len(bad), "unreadable": len(bad)}))
    print("--normalize " + ",".join(f"{v:.4f}" for v in (*mean, *std)))


def _train(args) -> None:
    from .config import from_args
    from .engine import train
    cfg = from_args(args)
    best = train(cfg)
    if best:
        chosen = (f"val top-1 {best['selected_val_top1']:.2%}" if "selected_val_top1" in best
                  else "the last epoch, no validation split")
        test = f"; test top-1 {best['test_top1']:.2%} (test split, once)" if "test_top1" in best else ""
        print(f"best epoch {best['epoch']} ({best['weights']} weights, {chosen}){test} -> {cfg.out}/best.pt")


def _evaluate(args) -> None:
    import os
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    m = evaluate(args.checkpoint, args.data, tta=args.tta, batch_size=args.batch_size, out_dir=out,
                 device=args.device, format=args.format)
    print(m["report"])
    topk = "".join(f"top-{k} {m[f'top{k}']:.2%}  " for k in (1, 3, 5) if k == 1 or k < len(m["per_class"]))  # k < K
    print(f"{topk}macro F1 {m['macro_f1']:.4f}  ECE {m['ece']:.2%}  NLL {m['nll']:.4f}  "
          f"on {m['images']} images (tta={m['tta']}"
          + (f"; {len(m['unreadable_images'])} unreadable skipped" if m["unreadable_images"] else "")
          + f"); metrics, predictions and plots in {out}")


def _not_an_input(out: str, **inputs: str) -> None:
    """Refuse an ``--out`` that is one of the command's inputs (``--out best.pt``: the checkpoint written over)."""
    for option, path in inputs.items():
        if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(path):
            raise ValueError(f"--out {out} is the --{option} path: it would be written over; choose another --out")


def _predict(args) -> None:
    _not_an_input(args.out, checkpoint=args.checkpoint, images=args.images)
    n = predict_folder(args.checkpoint, args.images, out_csv=args.out, tta=args.tta, batch_size=args.batch_size,
                       device=args.device, topk=args.topk)
    print(f"{n} images classified -> {args.out}")  # skipped files were named on stderr


def _explain(args) -> int:
    from inference.explain import MAX_GRID
    if not 1 <= args.grid <= MAX_GRID or args.views_per_forward < 1:
        print(f"error: --grid must be 1 to {MAX_GRID} and --views-per-forward at least 1", file=sys.stderr)
        return 2
    # a missing file, not a checkpoint, not an image, a grid too fine: one line through run_cli
    _not_an_input(args.out, checkpoint=args.checkpoint, image=args.image)
    r = explain_image(args.checkpoint, args.image, out=args.out, grid=args.grid, fill=args.fill,
                      views_per_forward=args.views_per_forward, device=args.device)
    print(f"{r['class']} (p={r['probability']:.3f}): {args.grid}x{args.grid} occlusion map over the "
          f"{r['size']}x{r['size']} input -> {r['out']}")
    return 0


COMMANDS = {"prepare-fashion-mnist": _prepare_fashion_mnist, "split": _split, "stats": _stats, "train": _train,
            "evaluate": _evaluate, "predict": _predict, "explain": _explain}  # what each subcommand runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args) or 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m training``: :func:`main` whose mistakes (a missing file, a bad value, a wrong order: a
    ``ValueError`` or one of ``inference.cli``'s) are one line and exit status 2."""
    return run_cli(main, argv, expected=(ValueError,))


if __name__ == "__main__":
    sys.exit(cli())
