"""``make bench``: stock TorchServe vs this project's handler vs the in-process limit, like for like, in ONE sitting.

Same weights (random init fixed by seed 0, ``tools.models``; ResNet-50 with 100 classes first, the
stock baseline's model) and the same payloads (real photos re-encoded as JPEG q90, ``tools.photos``:
``jpeg500`` at 500x375, ``phone12mp`` at 4032x3024 with phone-like file sizes, ``mixed`` from 0.1 to
12 MP). What makes every ratio like for like (``benchmarks.sitting`` runs it):

* **the same split search for stock and ours**: every configuration is served at each workers x
  threads point of ONE grid (``benchmarks.configs.search_grid``; 1x1, 1x2, 2x1 on 2 cores) in a short
  search run at the highest user count, and its best is its split (stock's best is the baseline);
  the grid and every search result go to the JSON. TTA configurations take ``ours_fp32``'s split; the
  models after the first take the first model's splits.
* **the in-process limit in the same split** (``benchmarks.limit``): W processes of T threads (and a
  decode pool of T) running decode + preprocess + forward at batch 8 at once, img/s summed.
* **gated variants only in best_gated/stock** (``benchmarks.gates``, ``--gates``): fp32 graphs by
  parity with eager; reduced precision only with a passing gate record from a trained model;
  the rest are reported as speed-only, in their own column.
* **repeats**: each configuration measured ``--repeats`` times at the highest user count, interleaved
  (stock, ours, ..., stock, ours, ...), all servers up at once and each loaded for ``--settle`` uncounted
  seconds first (TorchServe's JIT); medians and min-max are reported and every ratio comes from the
  medians of this sitting.
* **payloads**: the first set for every configuration, the other sets for ``--set-configs``.

Stock is TorchServe's built-in ``image_classifier`` serving an eager .mar (threads through
OMP_NUM_THREADS); ours is this project's handler with the exported graphs (ONNX Runtime fp32, OpenVINO
f32/bf16-hint/INT8), TTA none / flip / adaptive flip. Everything serves batch 8, max delay 10 ms. Load
comes from locustfile.py (headless, closed loop). Printed last: the search table, per model the result
table, where each configuration's served/limit goes (``benchmarks.accounting``: the cores of the workers,
the frontend, locust and idle in the steady part of the runs), then one machine-readable line
(``benchmarks.report``)::

    ratios: isa=C ours/stock=X runtime_gap=X best_gated/stock=X served/limit=X flip_tta_cost=X
    adaptive_tta_cost=X small/12mp=X ours/stock_12mp=X best_speed_only/stock=X ...

Full results: benchmarks/results/bench-<time>.json (grid, search, limits, every run, medians, gates,
the TTA cost breakdown) and PNG plots next to it. The defaults are sized to stay under about 40 minutes on 2 cores (``wall_s`` in the JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import psutil

from benchmarks.configs import BATCH, CONFIGS, MAX_BATCH_DELAY, Split, parse_grid, search_grid
from benchmarks.gates import DEFAULT_GATES, GateFileError, load_gates
from benchmarks.report import isa_class, machine, plots, report
from benchmarks.sitting import ModelSitting, Plan
from inference.atomic import write_bytes
from inference.cli import run as run_cli
from tools import REPO
from tools.models import MODELS, default_variants
from tools.photos import SETS, write_photos

WORK = REPO / "benchmarks" / ".work"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CONFIGS = ("stock,ours_fp32,ours_fp32_flip,ours_fp32_adaptive,ours_ov_f32,ours_ov_bf16,ours_ov_bf16_flip,"
                   "ours_ov_int8")
SMOKE = {"models": ["smoke"], "configs": ["ours_fp32", "ours_fp32_flip"], "users": [1, 16], "duration": 2,
         "low_duration": 2, "search_duration": 2, "warmup": 1, "settle": 1, "limit_seconds": 1.0, "tta_seconds": 0.2,
         "tta_rounds": 1, "photos": 3}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--users", default=",".join(map(str, (*Plan.low_users, Plan.top_users))),
                   help="closed-loop user counts; the highest is searched, repeated and gives the ratios, the others "
                   "run once per configuration (e.g. 1,16 adds the latency at 1 user)")
    p.add_argument("--duration", type=int, default=Plan.duration, help="seconds of each measured run at the highest "
                   "user count")
    p.add_argument("--low-duration", type=int, default=Plan.low_duration, help="seconds of each run at the lower "
                   "user counts")
    p.add_argument("--search-duration", type=int, default=Plan.search_duration, help="seconds of each search run "
                   "(per grid point)")
    p.add_argument("--warmup", type=int, default=Plan.warmup, help="seconds of the uncounted run on each freshly started server")
    p.add_argument("--settle", type=int, default=Plan.settle, help="seconds of the uncounted run of each chosen "
                   "server before the repeats, so that TorchServe's JIT has compiled the request path (0: none)")
    p.add_argument("--repeats", type=int, default=Plan.repeats, help="interleaved runs of each configuration at the highest "
                   "user count (medians reported)")
    p.add_argument("--grid", default=",".join(map(str, search_grid())),
                   help="workers x threads points of the split search, for stock and ours alike")
    p.add_argument("--batch", type=int, default=BATCH, help="TorchServe batchSize of every configuration, and the batch "
                   "of the in-process limits")
    p.add_argument("--max-batch-delay", type=int, default=MAX_BATCH_DELAY, help="TorchServe maxBatchDelay of every "
                   "configuration, ms")
    p.add_argument("--limit-seconds", type=float, default=Plan.limit_seconds, help="seconds of each in-process limit measurement")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"configurations of the first model (of {', '.join(CONFIGS)})")
    p.add_argument("--models", default="resnet50,cbam_resnet",
                   help=f"models (of {', '.join(MODELS)}), the first with --configs (its ratios are printed last), "
                   "the others with --other-configs in the first model's splits")
    p.add_argument("--other-configs", default="ours_fp32,ours_ov_bf16,ours_ov_int8",
                   help="configurations for the models after the first")
    p.add_argument("--sets", default=",".join(SETS),
                   help=f"payload sets (of {', '.join(SETS)}); jpeg500 for every configuration, the others for --set-configs")
    p.add_argument("--set-configs", default="stock,ours_fp32",
                   help="configurations that also run the payload sets after the first")
    p.add_argument("--small-model", default="cbam_resnet", help="the decode-bound model whose small/12mp is printed")
    p.add_argument("--gates", default=None, help="gate records of trained models (None: "
                   f"{DEFAULT_GATES.relative_to(REPO)}, which may be absent); see benchmarks/gates.py for the format")
    p.add_argument("--smoke", action="store_true", help="CI: the tiny model, ours_fp32 and its flip TTA, the whole "
                   "grid, 2-second runs, 3 photos in the second payload set")
    return p.parse_args(argv)


def json_safe(obj):
    """``obj`` with NaN/inf floats as None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        users = sorted({int(u) for u in args.users.split(",") if u.strip()})
        grid = parse_grid(args.grid)
    except ValueError as e:
        return fail(f"--users/--grid: {e}")
    if not users or min(users) < 1:
        return fail(f"--users must be user counts >= 1, got {args.users!r}")
    if args.batch < 1:
        return fail(f"--batch must be at least 1, got {args.batch}")
    if min(args.duration, args.low_duration, args.search_duration, args.repeats) < 1 or args.limit_seconds <= 0:
        # locust's -t 0s means "no time limit": the sitting would never end
        return fail(f"--duration, --low-duration, --search-duration and --repeats must be at least 1 and "
                    f"--limit-seconds above 0, got {args.duration}, {args.low_duration}, {args.search_duration}, "
                    f"{args.repeats} and {args.limit_seconds}")
    if min(args.warmup, args.settle) < 0:
        return fail(f"--warmup and --settle must be 0 or more, got {args.warmup} and {args.settle}")
    if args.max_batch_delay < 0:
        return fail(f"--max-batch-delay must be 0 or more, got {args.max_batch_delay}")
    names = [n for n in args.configs.split(",") if n]
    other_names = [n for n in args.other_configs.split(",") if n]
    models = [m for m in args.models.split(",") if m]
    plan = Plan(grid=grid, top_users=max(users or [16]), low_users=tuple(u for u in users if u != max(users or [16])),
                duration=args.duration, low_duration=args.low_duration, search_duration=args.search_duration,
                warmup=args.warmup, settle=args.settle, repeats=args.repeats, limit_seconds=args.limit_seconds,
                set_configs=tuple(n for n in args.set_configs.split(",") if n), batch=args.batch,
                max_batch_delay=args.max_batch_delay)
    photos = None
    if args.smoke:
        models, names = SMOKE["models"], SMOKE["configs"]
        plan.top_users, plan.low_users = max(SMOKE["users"]), tuple(SMOKE["users"][:-1])
        for k in ("duration", "low_duration", "search_duration", "warmup", "settle", "limit_seconds", "tta_seconds",
                  "tta_rounds"):
            setattr(plan, k, SMOKE[k])
        photos = SMOKE["photos"]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        return fail(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if len(set(models)) != len(models):
        return fail(f"--models names a model twice: {args.models}")
    unknown = [n for n in names + other_names + list(plan.set_configs) if n not in CONFIGS]
    if unknown:
        return fail(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    stock_models = [m for i, m in enumerate(models) if "stock" in (names if i == 0 else other_names) and m != "resnet50"]
    if stock_models:
        return fail(f"stock serves benchmarks/stock_resnet50.py (ResNet-50, 100 classes): it cannot run for "
                    f"{', '.join(stock_models)}; leave stock out of their configurations")
    missing = [f"{CONFIGS[n].name} ({m} exports {', '.join(default_variants(m))})" for i, m in enumerate(models)
               for n in (names if i == 0 else other_names)
               if CONFIGS[n].kind == "ours" and CONFIGS[n].variant not in default_variants(m)]
    if missing:
        return fail(f"no graph for {'; '.join(missing)}")
    sets = ["jpeg500"] + [s for s in args.sets.split(",") if s and s != "jpeg500"]
    if args.smoke:
        sets = sets[:2]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        return fail(f"unknown payload set(s) {unknown}; choose from {', '.join(SETS)}")
    try:
        gates = load_gates(args.gates, required=args.gates is not None)
    except GateFileError as e:
        return fail(str(e))
    work = WORK / ("smoke" if args.smoke else "full")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_photos(work / "payloads", tuple(sets), limit=photos)
    payloads = {s: work / "payloads" / s for s in sets}
    started = time.time()
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {isa_class()}; models "
          f"{', '.join(models)}; {len(list(payloads[sets[0]].rglob('*.jpg')))} photos in each of {', '.join(sets)}; grid "
          f"{', '.join(map(str, grid))}; {plan.repeats} interleaved repeats of {plan.duration} s at {plan.top_users} users; "
          f"{len(gates)} gate record(s)", flush=True)
    sittings: dict[str, dict] = {}
    inherit: dict[str, Split] = {}
    for i, model in enumerate(models):
        sitting = ModelSitting(model, names if i == 0 else other_names, plan=plan, payloads=payloads,
                               work=work / model, gates=gates, inherit=inherit if i else None)
        sittings[model] = sitting.run()
        print(f"{model}: done after {time.time() - started:.0f} s", flush=True)
        if i == 0:
            inherit = {r["name"]: Split(**r["split"]) for r in sittings[model]["results"] if r["split"]}
    first = models[0]
    small_model = models[0] if args.smoke else args.small_model  # the smoke's one tiny model is decode-bound
    small = sittings.get(small_model)
    if small is None:
        print(f"small/12mp: nan ({small_model} was not run; --small-model names the decode-bound model)", flush=True)
    grid_names = [str(g) for g in grid]
    summaries = {m: report(s, top=plan.top_users, low=list(plan.low_users), grid=grid_names, small=small)
                 for m, s in sittings.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"bench-{stamp}{'-smoke' if args.smoke else ''}"
    try:
        pngs = plots(sittings[first]["results"], out)
    except Exception as e:  # a plot is no reason to lose a 35-minute sitting's figures
        print(f"warning: the plots failed ({type(e).__name__}: {e}); the JSON is written without them", file=sys.stderr)
        pngs = []
    write_bytes(path=out.with_suffix(".json"), data=json.dumps(json_safe({
        "model": first, "users": users, "machine": machine(), "grid": grid_names,
        "plan": {**plan.__dict__, "grid": grid_names}, "gates": {"path": str(args.gates or DEFAULT_GATES),
                                                                "records": list(gates.values())},
        "results": sittings[first]["results"], "summary": summaries[first], "models": sittings, "summaries": summaries,
        "wall_s": round(time.time() - started), "plots": pngs}), indent=1, default=str, allow_nan=False).encode())
    print(f"\nfull results: {out.with_suffix('.json')}; plots: {', '.join(pngs)}; {time.time() - started:.0f} s")
    for model in models:
        print(f"\n{model}: split search at {plan.top_users} users (img/s)")
        print(summaries[model]["search_table"])
        print(f"\n{model}:")
        print(summaries[model]["table"])
        if summaries[model]["accounting"]:
            print(f"\n{model}: where served/limit goes (cores used during the steady part of the runs at "
                  f"{plan.top_users} users, medians; benchmarks/accounting.py)")
            print(summaries[model]["accounting_table"])
    s = summaries[first]
    print(f"\n(ratios of {first}; served/limit per configuration: "
          + ", ".join(f"{n}={v:.2f}" for n, v in s["served_over_limit"].items())
          + f"; best gated: {s['best_gated']}; best speed-only: {s['best_speed_only']})")
    print(s["ratios"])
    failed = [f"{model}/{r['name']}: " + ("did not run" if "error" in r else
                                          f"its in-process limit failed in {len(r['limit_errors'])} of "
                                          f"{len(r['limit_errors']) + len(r.get('limits') or [])} rounds")
              for model, sitting in sittings.items() for r in sitting["results"] if "error" in r or r.get("limit_errors")]
    if failed:  # the figures above are of what ran; a sitting with holes is no clean result
        print(f"incomplete sitting: {'; '.join(failed)} (the JSON has the errors)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # a mistake: one line, exit status 2 (inference.cli)
    sys.exit(run_cli(main))
