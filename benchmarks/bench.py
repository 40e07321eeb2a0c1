"""``make bench``: stock TorchServe vs this project's handler vs the in-process limit, in ONE sitting.

Same weights (ResNet-50, 100 classes, random init fixed by seed 0) and the same payloads (real photos
shipped in packages: foolbox's 20 ImageNet JPEGs and matplotlib's grace_hopper.jpg, re-encoded as JPEG
q90: ``jpeg500`` at 500x375 for every configuration and user count; ``phone12mp`` at 4032x3024 with
phone-like file sizes and ``mixed`` from 0.1 to 12 MP, at the highest user count for the
``--set-configs``; see ``tools.photos``):

* stock   -- TorchServe's built-in ``image_classifier`` handler serving an eager .mar, in the best
             stock configuration measured on this kind of machine: 2 workers, OMP_NUM_THREADS=1,
             batch 8, max delay 10 ms;
             (``--configs ours_fp32_1w,ours_ov_int8_2w`` run the other worker/thread splits)
* ours    -- this project's handler with the exported graphs (ONNX Runtime fp32, OpenVINO f32/INT8),
             TTA none / flip / adaptive flip;
* limit   -- the same backend in-process, no HTTP: decode + preprocess + forward at batch 8.

Load comes from locustfile.py (headless, closed loop) at each of --users. Printed last: a table of
img/s, p50, p99 and failures per configuration, then one machine-readable line
``ratios: isa=C ours/stock=X best/stock=V served/limit=Y flip_tta_cost=Z adaptive_tta_cost=W small/12mp=S
ours/stock_12mp=P`` (``small/12mp``: ours_fp32 of the decode-bound ``cbam_resnet``, 500x375 img/s over 12 MP
img/s; ``ours/stock_12mp``: the first model, 12 MP set).
Full results: benchmarks/results/bench-<time>.json and PNG plots next to it.

Modules: ``benchmarks.configs`` (the configurations), ``benchmarks.served`` (archives, TorchServe and
locust), ``benchmarks.limit`` (the in-process limit), ``benchmarks.report`` (table, ratios, plots);
models, photos, locust and TorchServe come from ``tools``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import psutil

from benchmarks.configs import CONFIGS
from benchmarks.limit import adaptive_threshold, in_process_limit
from benchmarks.report import isa_class, machine, plots, report
from benchmarks.served import build_archives, run_served
from tools import REPO
from tools.models import MODELS, export_random_model
from tools.photos import SETS, write_photos

WORK = REPO / "benchmarks" / ".work"
RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="1,4,16", help="closed-loop user counts")
    p.add_argument("--duration", type=int, default=20, help="seconds per load level")
    p.add_argument("--configs", default="stock,ours_fp32,ours_fp32_flip,ours_fp32_adaptive,ours_ov_f32,ours_ov_bf16,"
                   "ours_ov_int8",
                   help=f"configurations to run (of {', '.join(CONFIGS)})")
    p.add_argument("--models", default="resnet50,cbam_resnet,se_resnext101_32x8d",
                   help="models, the first with every configuration (its ratios are printed last), the others with "
                   "--other-configs at --other-users")
    p.add_argument("--other-configs", default="ours_fp32,ours_ov_bf16,ours_ov_int8",
                   help="configurations for the models after the first")
    p.add_argument("--other-users", default="1,16", help="closed-loop user counts for the models after the first")
    p.add_argument("--sets", default=",".join(SETS),
                   help=f"payload sets (of {', '.join(SETS)}); the first at every user count, the others at the highest")
    p.add_argument("--set-configs", default="stock,ours_fp32",
                   help="configurations that also run the payload sets after the first")
    p.add_argument("--small-model", default="cbam_resnet", help="the decode-bound model whose small/12mp is printed")
    p.add_argument("--smoke", action="store_true", help="CI: a tiny model, ours_fp32 only, 1 user, 5 s, "
                   "3 photos in the second payload set")
    return p.parse_args(argv)


def run_model(model: str, names: list[str], users: list[int], duration: int, payloads: dict, work,
              set_configs: list[str]) -> dict:
    """Every configuration in ``names`` for one model: its in-process limit, then served under load
    (the ``set_configs`` on every payload set of ``payloads``)."""
    payload_dir = next(iter(payloads.values()))
    configs = [CONFIGS[n] for n in names]
    work.mkdir()
    prep = export_random_model(model, work, calib_data=payload_dir)
    threshold = adaptive_threshold(prep.export_dir, prep.spec, payload_dir) if any(c.adaptive for c in configs) else 0.9
    store = work / "model_store"
    build_archives(configs, prep, store, threshold)
    results = []
    for c in configs:
        limit = in_process_limit(c, prep, payload_dir) if c.kind == "ours" else None
        results.append(run_served(c, store, payloads, users, duration, work, model, limit,
                                  other_sets=c.name in set_configs))
    return {"users": users, "adaptive_threshold": threshold, "results": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    users = [int(u) for u in args.users.split(",")]
    names = args.configs.split(",")
    models = [m for m in args.models.split(",") if m]
    if args.smoke:
        models, users, args.duration, names = ["smoke"], [1], 5, ["ours_fp32"]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    work = WORK / ("smoke" if args.smoke else "full")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sets = ["jpeg500"] + [s for s in args.sets.split(",") if s and s != "jpeg500"]  # jpeg500: every user count
    if args.smoke:
        sets = sets[:2]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise SystemExit(f"unknown payload set(s) {unknown}; choose from {', '.join(SETS)}")
    write_photos(work / "payloads", tuple(sets), limit=3 if args.smoke else None)
    payloads = {s: work / "payloads" / s for s in sets}
    set_configs = [n for n in args.set_configs.split(",") if n]
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {isa_class()}; models "
          f"{', '.join(models)}; {len(list(payloads[sets[0]].rglob('*.jpg')))} photos in each of {', '.join(sets)}",
          flush=True)
    summaries, all_results = {}, {}
    for i, model in enumerate(models):
        # The first model gets the full matrix (stock included); the others the fp32 and the best variant.
        model_names = names if i == 0 else [n for n in args.other_configs.split(",") if n]
        model_users = users if i == 0 else [int(u) for u in args.other_users.split(",")]
        all_results[model] = run_model(model, model_names, model_users, args.duration, payloads, work / model,
                                       set_configs)
    for model in models:
        small = all_results.get(args.small_model, all_results[model])["results"]
        summaries[model] = report(all_results[model]["results"], users if model == models[0] else
                                  [int(u) for u in args.other_users.split(",")],
                                  all_results[model]["adaptive_threshold"], small_model=small)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"bench-{stamp}{'-smoke' if args.smoke else ''}"
    first = models[0]
    pngs = plots(all_results[first]["results"], out)
    out.with_suffix(".json").write_text(json.dumps({
        "model": first, "users": users, "duration_s": args.duration, "machine": machine(),
        "adaptive_threshold": all_results[first]["adaptive_threshold"], "results": all_results[first]["results"],
        "summary": summaries[first], "models": all_results, "summaries": summaries, "plots": pngs},
        indent=1, default=str))
    print(f"\nfull results: {out.with_suffix('.json')}; plots: {', '.join(pngs)}")
    for model in models:
        print(f"\n{model}:")
        print(summaries[model]["table"])
    print(f"\n(ratios of {first})")
    print(summaries[first]["ratios"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
