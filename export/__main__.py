"""``python -m export`` (export), ``python -m export verify`` and ``python -m export archive``."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from inference.cli import run as run_cli
from inference.settings import HandlerSettings, SettingsError, WorkerSettings, add_arguments
from inference.tta import GRAPH_TTA_MODES

from .archive import ARCHIVE_FORMATS, DEFAULT_MODEL_STORE, DEFAULT_VARIANT, DEFAULT_VERSION
from .formats import VARIANTS
from .image_sets import DEFAULT_EVAL_IMAGES
from .int8 import DEFAULT_MARGIN, DEFAULT_MAX_REVERTS
from .splits import DEFAULT_CALIB_IMAGES, DEFAULT_VAL_IMAGES
from .staging import recover
from .verify import DEFAULT_MAX_DROP, DEFAULT_MIN_INT8_AGREEMENT
from .wrappers import DEFAULT_GRAPH_TOPK, DEFAULT_GRAPH_TTA

REFUSED_EXIT = 3  # some variants were refused by the tolerance/accuracy gate; the others were written


def _variant_table() -> str:
    return "\n".join(f"  {v.name:<17} {v.precision:<5} {v.purpose}" for v in VARIANTS.values())


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a training checkpoint into graphs that take uint8 NCHW images (input 'images', "
        "N x 3 x S x S at the model's input size, dynamic batch) and normalize inside the graph.\n\n"
        "What is folded: /255, -mean and /std become one per-channel multiply-add (not merged into the first\n"
        "convolution: with zero padding that would change the border pixels); BatchNorm is folded into the\n"
        "convolutions (TorchScript freezing; the ONNX exporter in eval mode).\n\n"
        "Every variant is written and compared with the eager model on real images (--data) in a staging folder\n"
        "inside DIR, and refused (never moved into DIR) when it is off tolerance or loses more than --max-drop\n"
        "top-1 points (exit status 3: the others are written). Each INT8 variant is also timed against its fp32\n"
        "graph, in turns, on one thread (per core) and on all (one process). DIR/export.json lists each file with its SHA-256,\n"
        "runtime, precision, input, outputs, numbers, date and checkpoint; a later run into DIR replaces the\n"
        "entries of the variants it writes and keeps the others. Subcommands: `python -m export verify --help`,\n"
        "`python -m export archive --help`.\n\nVariants (--formats):\n" + _variant_table())
    p.add_argument("--checkpoint", required=True, help="best.pt/last.pt written by `python -m training train`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--formats", default="torchscript,onnx", help="comma-separated variants, or 'all' "
                   "(default: %(default)s)")
    p.add_argument("--data", default=None, help="labelled ImageFolder tree (e.g. DATA/test; a data-set root DATA "
                   "means its test/) for parity and accuracy; without it parity uses random images and INT8 "
                   "variants are refused")
    p.add_argument("--calib-data", default=None, help="images for INT8 calibration (default: the training images "
                   "of the checkpoint's run, without its validation images)")
    p.add_argument("--val-data", default=None, help="labelled images (not the test split) that INT8's accuracy "
                   "control is judged on (default: the checkpoint's run's validation split: DATA/val, or the same "
                   "seeded --val-fraction of DATA/train that chose best.pt)")
    p.add_argument("--val-images", type=int, default=DEFAULT_VAL_IMAGES, help="validation images for INT8's accuracy control "
                   "(default: %(default)s)")
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_INT8_AGREEMENT,
                   help="smallest accepted share of images whose INT8 top-1 equals fp32's, on --data "
                   "(default: %(default)s); INT8 keeps layers in fp32 until the validation split is within this "
                   "and --max-drop, then the test gate (--data) checks both again")
    p.add_argument("--val-margin", type=float, default=DEFAULT_MARGIN,
                   help="share of --max-drop and of the disagreement that --min-agreement allows which INT8's "
                   "accuracy control may spend on the validation split (default: %(default)s); below 1 it keeps "
                   "more layers in fp32 so that sampling noise between validation and test images does not "
                   "refuse the graph at the test gate (0.7 with 2000 validation images: about two standard "
                   "errors of a 99%% agreement; 1: the whole budget, a coin flip at the test gate for a graph "
                   "that just keeps it)")
    p.add_argument("--max-reverts", type=int, default=DEFAULT_MAX_REVERTS,
                   help="iterations of INT8's accuracy control (NNCF's max_num_iterations; default: %(default)s): each "
                   "reverts one more group of layers to fp32, or steps back and re-ranks (minutes on a large "
                   "model); more lets a model whose INT8 churns keep the budget, with more layers in fp32")
    p.add_argument("--eval-images", type=int, default=DEFAULT_EVAL_IMAGES, help="images of --data used for parity/accuracy "
                   "(default: %(default)s)")
    p.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES, help="calibration images (default: %(default)s)")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, help="largest accepted top-1 accuracy drop "
                   "of a reduced-precision variant, in points (default: %(default)s)")
    p.add_argument("--graph-tta", default=DEFAULT_GRAPH_TTA, choices=GRAPH_TTA_MODES,
                   help="TTA of the onnx-tta graph; five_crop/ten_crop take input at the resize size "
                   "(default: %(default)s)")
    p.add_argument("--graph-topk", type=int, default=DEFAULT_GRAPH_TOPK, help="k of the onnx-topk graph (default: %(default)s)")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export verify", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run eager and every exported graph (ONNX Runtime CPU, and CUDA EP when present; OpenVINO with "
        "the f32 and bf16 precision hints; TorchScript) on real images and print max/mean absolute difference, "
        "top-1 and top-k agreement, accuracy and latency per image. A graph whose SHA-256 differs from export.json "
        "(or the model card), or that was exported from another checkpoint, is reported and not run; with "
        "--archive, a checkpoint whose SHA-256 differs from the card's checkpoint_sha256 is refused.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help="export folder")
    src.add_argument("--archive", help="a .mar built by `python -m export archive`")
    p.add_argument("--data", default=None, help="labelled ImageFolder tree")
    p.add_argument("--checkpoint", default=None, help="eager reference (default: the one recorded at export)")
    p.add_argument("--eval-images", type=int, default=DEFAULT_EVAL_IMAGES, help="images used")
    return p


def _archive_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export archive", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Build MODEL_STORE/NAME.mar with torch-model-archiver from an export folder: the graph, the "
        "handler, the inference core (inference/), index_to_name.json, model_card.json and model-config.yaml. The archive "
        "is self-contained: a stock TorchServe with torch/torchvision (plus onnxruntime or openvino for those "
        "variants) serves it. With several variants, one archive each, named NAME_<variant>. A graph is packed only "
        "when its SHA-256 is the one export.json records; the archive is written under a temporary name in the "
        "model store and renamed onto NAME.mar, so an earlier NAME.mar stays whole until the new one is complete.")
    p.add_argument("--dir", required=True, help="export folder written by `python -m export`")
    p.add_argument("--variant", "--format", dest="variant", default=DEFAULT_VARIANT,
                   help=f"comma-separated variants to archive ({', '.join(VARIANTS)}, or all exported)")
    p.add_argument("--name", required=True, help="model name: the URL is /predictions/NAME")
    p.add_argument("--version", default=DEFAULT_VERSION, help="model version for TorchServe's versioned management API")
    p.add_argument("--file-name", default=None, help="archive file name without .mar (default: the model name; "
                   "with several variants, FILE_NAME_<variant>); lets two versions of one model sit in one model store")
    p.add_argument("--model-store", default=DEFAULT_MODEL_STORE, help="folder the archive is written to")
    p.add_argument("--archive-format", default=ARCHIVE_FORMATS[0], choices=ARCHIVE_FORMATS,
                   help="default: a zip .mar; no-archive: a plain folder, for development")
    p.add_argument("--allow-earlier-checkpoint", action="store_true",
                   help="pack a variant that an earlier export into --dir wrote from another checkpoint than the "
                   "folder's latest export (refused by default: it would serve other weights)")
    add_arguments(p, WorkerSettings)
    add_arguments(p, HandlerSettings)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "archive":
        from .archive import ARCHIVER_TMPDIR_NOTE, ArchiverError, archive_plan, archiver_command, build_archives
        args = _archive_parser().parse_args(argv[1:])
        options = {f.name: getattr(args, f.name) for cls in (WorkerSettings, HandlerSettings) for f in fields(cls)
                   if f.metadata["cli"]}
        try:
            recover(out=args.dir)  # an export cut off in its commit: finish it first (else its graphs look changed)
            paths = build_archives(args.dir, variants=args.variant, name=args.name, version=args.version,
                                   file_name=args.file_name, model_store=args.model_store,
                                   archive_format=args.archive_format,
                                   allow_earlier_checkpoint=args.allow_earlier_checkpoint, **options)
        except (SettingsError, FileNotFoundError, ValueError, ArchiverError) as e:
            raise SystemExit(f"error: {e}") from None
        plan = archive_plan(args.dir, variants=args.variant, name=args.name, file_name=args.file_name,
                            allow_earlier_checkpoint=True)  # the names of what was built (checked above)
        for path, (variant, name, file_name) in zip(paths, plan):
            print(f"wrote {path}; the same by hand:\n  " + archiver_command(
                args.dir, variant=variant, name=name, version=args.version, file_name=file_name,
                model_store=args.model_store, archive_format=args.archive_format))
        print(f"  ({ARCHIVER_TMPDIR_NOTE})")
        return 0
    if argv and argv[0] == "verify":
        from .audit import verify
        args = _verify_parser().parse_args(argv[1:])
        try:
            if args.dir:
                recover(out=args.dir)  # an export cut off in its commit: finish it first (else its graphs look changed)
            rows = verify(args.dir, data=args.data, checkpoint=args.checkpoint, eval_images=args.eval_images,
                          archive=args.archive)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        bad = {k: r["problems"] for k, r in rows.items() if r.get("problems")}
        for k, v in bad.items():
            print(f"{k}: {'; '.join(v)}")
        return 1 if bad else 0
    from .exporter import Exporter, RefusedVariants
    from .formats import parse_variants
    args = _export_parser().parse_args(argv)
    try:
        names = parse_variants(args.formats)
    except ValueError as e:
        raise SystemExit(f"--formats: {e}") from None
    try:
        exporter = Exporter(args.checkpoint, args.out, graph_tta=args.graph_tta, graph_topk=args.graph_topk)
        manifest = exporter.run(names, data=args.data, calib_data=args.calib_data, eval_images=args.eval_images,
                                calib_images=args.calib_images, max_drop=args.max_drop, val_data=args.val_data,
                                val_images=args.val_images, min_agreement=args.min_agreement,
                                val_margin=args.val_margin, max_reverts=args.max_reverts)
    except RefusedVariants as e:
        print(f"error: {e}", file=sys.stderr)
        return REFUSED_EXIT
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for name in names:
        print(f"wrote {name}: {', '.join(os.path.join(args.out, f) for f in manifest['variants'][name]['files'])}")
    return 0


if __name__ == "__main__":  # a mistake (a missing file, a wrong order): one line, exit status 2
    sys.exit(run_cli(main, expected=(ValueError,)))
