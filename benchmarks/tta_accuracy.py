"""Accuracy and cost of the handler's TTA modes, adaptive TTA included, on a labelled image folder.

    python -m benchmarks.tta_accuracy --graph exports/demo/model.onnx --data data/fashion-mnist/test
    python -m benchmarks.tta_accuracy --graph exports/demo/model.onnx \
        --validation-of runs/demo/best.pt   # the validation split that chose best.pt: choose thresholds here

Runs the handler's own functions in-process (decode -> canvas preset -> TTA views -> one forward ->
aggregation) through the exported graph on the CPU, for every image of the folder, and prints a
Markdown table: top-1 accuracy, views per image, adaptive trigger rate, forward time per image and
its cost relative to no TTA. The time of a pass over the folder is the median of
``torch.utils.benchmark.Timer`` blocks (``tools.timing``): at least one warm-up pass and one timed pass
per mode, more where a pass is shorter than ``--min-time``.

``--validation-of RUN/best.pt`` evaluates on the validation split that chose that checkpoint (``DATA/val``, or the
fraction ``train`` held out of ``DATA/train``), rebuilt from the run's recorded data and settings by
:func:`export.splits.held_out` (as INT8's export judges on it) and refused unless it is the very images the
checkpoint records (its ``selection.digest``): tune adaptive-TTA thresholds there, then report the chosen one
once on the test split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from inference.backends import load_backend
from inference.images import read_image_file
from inference.tta import adaptive_predict_proba, canvas_preset, num_views, predict_proba
from tools.timing import seconds_per_call
from training.image_folder import scan_image_folder


def evaluation_images(*, data: str | None = None, validation_of: str | None = None) -> tuple[list[str], list[int], str]:
    """``(paths, labels, source)``: every image of the ImageFolder tree ``data``, or the validation split that
    chose the checkpoint ``validation_of`` (checked against its digest; a ``ValueError`` when it cannot be
    rebuilt as it was)."""
    if validation_of is None:
        _, paths, labels = scan_image_folder(data)
        return paths, labels, data
    from export.splits import held_out
    from training.checkpoint import load_checkpoint

    spec, _, ckpt = load_checkpoint(validation_of)
    try:
        split = held_out(checkpoint_config=ckpt.get("config") or {}, class_names=spec.class_names,
                         val_images=sys.maxsize, calib_images=0, selection=ckpt.get("selection"))
    except ValueError as e:  # its advice names export's options (in parentheses here): say this script's
        raise ValueError(f"--validation-of {validation_of}: the validation split that chose it cannot be rebuilt "
                         f"here ({e}); pass --data with labelled validation images instead (not the test split)") from None
    return split.val_paths, split.val_labels, split.val_source


def run(args) -> list[dict]:
    paths, labels, source = evaluation_images(data=args.data, validation_of=args.validation_of)
    print(f"images: {len(paths)} of {source}", file=sys.stderr)
    with open(os.path.join(os.path.dirname(args.graph), "export.json")) as f:
        manifest = json.load(f)
    crop, resize = manifest["input_size"], manifest["resize_size"]
    if args.limit:
        paths, labels = paths[:: max(1, len(paths) // args.limit)], labels[:: max(1, len(labels) // args.limit)]
    labels = torch.tensor(labels)
    decoded = [read_image_file(p, min_side=resize) for p in paths]  # as the handler decodes (the canvas needs resize)
    backend = load_backend(args.graph, threads=torch.get_num_threads())
    configs = [("none", None), ("flip", None), ("multi_scale", None), ("ten_crop", None)]
    configs += [("flip", t) for t in args.thresholds]
    rows = []
    for mode, threshold in configs:
        canvas = canvas_preset(mode, crop_size=crop, resize_size=resize).batch(decoded)
        last = {}

        def one_pass():
            probs, views, applied = [], 0, 0
            for i in range(0, len(canvas), args.batch):
                chunk = canvas[i:i + args.batch]
                if threshold is None:
                    probs.append(predict_proba(backend, chunk, mode, crop_size=crop))
                    views += len(chunk) * num_views(mode)
                else:
                    p, a = adaptive_predict_proba(backend, chunk, mode, crop_size=crop, threshold=threshold)
                    probs.append(p)
                    applied += int(a.sum())
                    views += len(chunk) + int(a.sum()) * (num_views(mode) - 1)
            last.update(probs=torch.cat(probs), views=views, applied=applied)
        seconds = seconds_per_call(one_pass, min_run_time=args.min_time)
        acc = (last["probs"].argmax(1) == labels).float().mean().item()
        rows.append({"mode": mode if threshold is None else f"adaptive {mode} (confidence < {threshold})",
                     "top1": acc, "views_per_image": last["views"] / len(canvas),
                     "trigger_rate": last["applied"] / len(canvas) if threshold is not None else None,
                     "ms_per_image": seconds * 1000 / len(canvas)})
    base = rows[0]["ms_per_image"]
    for r in rows:
        r["cost_vs_none"] = r["ms_per_image"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", required=True, help="an exported uint8 logits graph (.onnx/.pt/.xml) with export.json beside it")
    images = p.add_mutually_exclusive_group(required=True)
    images.add_argument("--data", help="labelled ImageFolder tree (e.g. the test split, once thresholds are chosen)")
    images.add_argument("--validation-of", metavar="CHECKPOINT",
                        help="the validation split that chose this checkpoint (RUN/best.pt), rebuilt and checked as "
                             "INT8's export does: choose thresholds here")
    p.add_argument("--batch", type=int, default=64, help="images per forward (as the server's batch)")
    p.add_argument("--thresholds", default="0.6,0.8,0.9,0.95", help="adaptive TTA confidence thresholds")
    p.add_argument("--limit", type=int, default=0, help="use about this many images (0: all)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of timed passes per mode at least (the median pass is reported)")
    args = p.parse_args(argv)
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = run(args)
    print("| TTA | top-1 | views/image | TTA applied | ms/image | cost vs none |\n|---|---|---|---|---|---|")
    for r in rows:
        trig = "-" if r["trigger_rate"] is None else f"{r['trigger_rate']:.1%}"
        print(f"| {r['mode']} | {r['top1']:.2%} | {r['views_per_image']:.2f} | {trig} | {r['ms_per_image']:.3f} | "
              f"{r['cost_vs_none']:.2f}x |")
    return 0


if __name__ == "__main__":
    from inference.cli import run as run_cli

    sys.exit(run_cli(main, expected=(ValueError,)))
