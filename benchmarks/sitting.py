"""One model's part of a ``make bench`` sitting: split search, in-process limits, interleaved repeats.

For one model (random weights, ``tools.models``) and its configurations (``benchmarks.configs``):

1. **Search.** Every searched configuration, stock and ours alike, is served at each point of the
   grid (workers x threads) and loaded at the highest user count for a short run (after a warm-up run
   that is not counted); the best img/s is its split. Every result is recorded. The best server stays
   up; the others are stopped. Configurations with ``split_of`` (TTA) take that configuration's
   split; the models after the first take the first model's splits (``inherit``).
2. **TTA breakdown** (``benchmarks.tta_cost``) in the flip configuration's threads.
3. **Repeats and limits.** With every chosen server up (idle ones cost nothing) and each of them loaded for
   ``settle`` uncounted seconds first (a fresh TorchServe's Java spends about twice the CPU per request
   until its JIT has compiled the request path: a sitting of 2026-12-04 measured 1.03 ms of frontend CPU
   per image in the first round of OpenVINO INT8 and 0.73 in the third), ``repeats`` rounds at
   the highest user count on the first payload set, each round every configuration in turn (stock,
   ours, ..., stock, ours, ...) and then, in the same round, each ours configuration's in-process
   limit in its split (``benchmarks.limit``) and eager PyTorch fp32 in stock's split (``runtime_gap``;
   ``ours_fp32``'s where stock is not run; :func:`eager_split`): the limit is the median of the rounds,
   so a slow or fast moment of the machine reaches the served runs and the limits alike (one limit per sitting once read 56.7 img/s and, an
   hour later, 93.4 for the same configuration). Then the same served rounds for the ``set_configs``
   on the other payload sets; then one run per configuration at each lower user count. Medians and
   min-max per (set, users).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.configs import BATCH, CONFIGS, MAX_BATCH_DELAY, Config, Split
from benchmarks.gates import verdict
from benchmarks.limit import LimitJob, adaptive_threshold, in_process_limit
from benchmarks.report import PAIRED_SET
from benchmarks.served import Served, build_archive_for
from benchmarks.tta_cost import breakdown
from tools.models import arch_of, export_random_model


def eager_split(results: dict) -> tuple[Split, str] | None:
    """Where eager fp32's in-process limit runs: in stock's chosen split (stock is eager fp32 served), so that
    ``runtime_gap`` compares each runtime in the split its served side runs in, as ``ours/stock`` does; in
    ``ours_fp32``'s where stock has no split. ``(split, whose)``, or None without ours_fp32."""
    fp32, stock = results.get("ours_fp32"), results.get("stock")
    if not (fp32 and fp32.get("split")):
        return None
    whose = "stock" if stock and stock.get("split") else "ours_fp32"
    return Split(**results[whose]["split"]), whose


@dataclass
class Plan:
    """How much of everything one sitting runs."""
    grid: list[Split]
    top_users: int = 16
    low_users: tuple[int, ...] = ()  # e.g. (1,): one run per configuration at 1 user (latency unloaded)
    duration: int = 12          # seconds of each measured run
    low_duration: int = 10      # seconds of each lower-user run
    search_duration: int = 8    # seconds of each search run
    warmup: int = 3             # seconds of the uncounted run on a freshly started server
    settle: int = 20            # seconds of the uncounted run of each chosen server before the repeats (JIT)
    repeats: int = 3
    limit_seconds: float = 8.0
    tta_seconds: float = 1.0     # per item and round of the TTA breakdown
    tta_rounds: int = 3          # interleaved rounds of the TTA breakdown
    set_configs: tuple[str, ...] = ("stock", "ours_fp32")
    batch: int = BATCH          # TorchServe batchSize of every configuration, and the in-process limit's batch
    max_batch_delay: int = MAX_BATCH_DELAY  # ms, TorchServe maxBatchDelay of every configuration


def rotated(items: list, i: int) -> list:
    """``items`` from its ``i``-th on, then the rest: round ``i``'s order, so that the interleaved runs (stock,
    ours, ... ) take turns at coming first, right after the previous round's in-process limits."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def key(set_name: str, users: int) -> str:
    return f"{set_name}@{users}"


def medians(runs: list[dict]) -> dict[str, dict]:
    """``{"SET@USERS": {"img_s", "min", "max", "n", "p50_ms", "p99_ms", "failures"}}``: medians of the runs."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(key(r["set"], r["users"]), []).append(r)

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None
    return {k: {"img_s": med([r["img_s"] for r in rs]), "min": min(r["img_s"] for r in rs),
                "max": max(r["img_s"] for r in rs), "n": len(rs), "p50_ms": med([r["p50_ms"] for r in rs]),
                "p99_ms": med([r["p99_ms"] for r in rs]), "failures": sum(r["failures"] for r in rs)}
            for k, rs in groups.items()}


class ModelSitting:
    """The configurations ``names`` of one model, run as the module docstring says."""

    def __init__(self, model: str, names: list[str], *, plan: Plan, payloads: dict[str, Path], work: Path,
                 gates: dict, inherit: dict[str, Split] | None = None):
        self.model, self.plan, self.payloads, self.work, self.gates = model, plan, payloads, work, gates
        self.configs: list[Config] = [CONFIGS[n] for n in names]
        self.inherit = inherit or {}
        self.servers: dict[str, Served] = {}
        self.results: dict[str, dict] = {}

    # -- the phases --------------------------------------------------------------------------------
    def run(self) -> dict:
        self.work.mkdir(parents=True)
        first_set = next(iter(self.payloads.values()))
        # INT8 keeps in fp32 what the gated export of a trained model of this architecture kept (benchmarks.gates)
        gated_int8 = self.gates.get((arch_of(self.model), "openvino-int8")) or {}
        self.prep = export_random_model(self.model, self.work, calib_data=first_set,
                                        keep_fp32=gated_int8.get("kept_fp32") or [])
        self.manifest = json.loads((self.prep.export_dir / "export.json").read_text())
        self.threshold = adaptive_threshold(self.prep.export_dir, self.prep.spec, first_set) \
            if any(c.adaptive for c in self.configs) else 0.9
        self.store = self.work / "model_store"
        try:
            for c in self.configs:
                self.results[c.name] = self.describe(c)
                self.choose_split(c)
            extra = self.tta_breakdown()
            self.repeats(extra)
        finally:
            for s in self.servers.values():
                s.stop()
        for r in self.results.values():
            r["medians"] = medians(r["runs"])
        return {"model": self.model, "arch": self.prep.spec.arch, "adaptive_threshold": self.threshold,
                "results": list(self.results.values()), **extra}

    def describe(self, c: Config) -> dict:
        from inference.backends import openvino_precision
        out = {"name": c.name, "config": asdict(c), "split": None, "split_source": None, "search": [],
               "limit": None, "limit_img_s": None, "runs": []}
        if c.kind == "ours":
            info = self.manifest["variants"].get(c.variant)
            if info is None:
                raise SystemExit(f"the {self.model} export has no {c.variant} graph (it has "
                                 f"{', '.join(self.manifest['variants'])}): leave {c.name} out of its configurations")
            precision = openvino_precision(c.handler.get("openvino_precision", "auto")) \
                if info.get("runtime") == "openvino" else None
            out["runtime_precision"] = precision
            out["gate"] = verdict(arch=self.prep.spec.arch, variant_info=info, variant=c.variant,
                                  runtime_precision=precision, gates=self.gates,
                                  model_kwargs=self.prep.spec.model_kwargs or {})
        else:
            out["gate"] = {"status": "baseline", "counts": False, "label": "stock (eager fp32)"}
        return out

    def start(self, c: Config, split: Split) -> Served:
        name = build_archive_for(c, split, self.prep, self.store, self.threshold, batch=self.plan.batch,
                                 max_batch_delay=self.plan.max_batch_delay)
        served = Served(c, split, store=self.store, name=name, work=self.work, label=self.model).start()
        try:
            if self.plan.warmup:
                served.run(next(iter(self.payloads.values())), self.plan.top_users, self.plan.warmup,
                           tag=f"{name}-warmup", quiet=True)
        except BaseException:
            served.stop()
            raise
        return served

    def choose_split(self, c: Config) -> None:
        res, plan = self.results[c.name], self.plan
        if c.split_of and c.split_of in self.results and self.results[c.split_of]["split"]:
            split, source = Split(**self.results[c.split_of]["split"]), c.split_of
        elif c.name in self.inherit:
            split, source = self.inherit[c.name], "first model"
        else:
            split, source = None, "search"
        if split is not None:
            try:
                self.servers[c.name] = self.start(c, split)
            except Exception as e:  # noqa: BLE001 -- recorded; the other configurations still run
                res["error"] = f"{split} did not start: {str(e)[-500:]}"
                print(f"{self.model:<12.12} {c.name:<19} {split!s:<4} did not start ({str(e)[:200]})", flush=True)
                return
            res["split"], res["split_source"] = asdict(split), source
            return
        first_set, first = next(iter(self.payloads.items()))
        best = None
        for point in plan.grid:
            entry = {"split": str(point), **asdict(point)}
            try:
                served = self.start(c, point)
            except Exception as e:  # noqa: BLE001 -- a split that does not start is a result too
                entry["error"] = str(e)[-500:]
                res["search"].append(entry)
                print(f"{self.model:<12.12} {c.name:<19} {point!s:<4} search: did not start ({str(e)[:200]})", flush=True)
                continue
            try:
                r = served.run(first, plan.top_users, plan.search_duration, tag=f"{served.name}-search",
                               set=first_set, phase="search")
            except BaseException:
                served.stop()
                if best is not None:
                    best[0].stop()
                raise
            entry.update({k: r[k] for k in ("img_s", "p50_ms", "p99_ms", "failures", "requests")})
            res["search"].append(entry)
            if best is None or (r["img_s"], -r["failures"]) > (best[1]["img_s"], -best[1]["failures"]):
                if best is not None:
                    best[0].stop()
                best = (served, r)
            else:
                served.stop()
        if best is None:
            res["error"] = "no grid point started"
            return
        self.servers[c.name] = best[0]
        res["split"], res["split_source"] = asdict(best[0].split), "search"
        print(f"{self.model:<12.12} {c.name:<19} best split {best[0].split} ({best[1]['img_s']:.1f} img/s of "
              + ", ".join(f"{e['split']} {e.get('img_s', float('nan')):.1f}" for e in res["search"]) + ")", flush=True)

    def job(self, c: Config, **kw) -> LimitJob:
        spec, info = self.prep.spec, self.manifest["variants"].get(c.variant)
        payloads = tuple(str(p) for p in sorted(next(iter(self.payloads.values())).rglob("*.jpg")))
        from inference.settings import HandlerSettings
        return LimitJob(payloads=payloads, crop_size=spec.input_size, resize_size=spec.resize_size,
                        graph=str(self.prep.export_dir / info["files"][0]) if info else None,
                        precision=self.results[c.name].get("runtime_precision") or "f32", tta=c.tta,
                        adaptive=c.adaptive, threshold=self.threshold,
                        max_forward_batch=c.handler.get("max_forward_batch", HandlerSettings.max_forward_batch),
                        seconds=self.plan.limit_seconds, batch=self.plan.batch, **kw)

    def limit_round(self, extra: dict, round_: int) -> None:
        """One in-process limit of every ours configuration in its split, and of eager fp32 (:func:`eager_split`),
        appended to their lists (``limits``, ``extra["eager_limits"]``); ``limit_img_s`` / ``eager_limit`` are
        the medians so far. A failed limit is recorded (``limit_errors``); the served runs still count."""
        for c in self.configs:
            res = self.results[c.name]
            if c.kind != "ours" or not res["split"]:
                continue
            split = Split(**res["split"])
            try:
                lim = in_process_limit(self.job(c), split)
            except RuntimeError as e:
                res.setdefault("limit_errors", []).append(str(e)[-2000:])
                print(f"{self.model:<12.12} {c.name:<19} {split!s:<4} in-process limit #{round_ + 1} failed: "
                      f"{str(e)[-300:]}", flush=True)
                continue
            res.setdefault("limits", []).append(lim)
            res["limit"] = lim
            res["limit_img_s"] = statistics.median(x["img_s"] for x in res["limits"])
            print(f"{self.model:<12.12} {c.name:<19} {split!s:<4} in-process limit #{round_ + 1} {lim['img_s']:.1f} img/s "
                  f"({split.workers} process(es) x {split.threads} thread(s): "
                  + " + ".join(f"{x:.1f}" for x in lim["per_process"]) + f"; {lim['cores']:.2f} cores busy)", flush=True)
        where = eager_split(self.results)
        if where is not None:
            split, whose = where
            try:
                eager = in_process_limit(self.job(CONFIGS["ours_fp32"], eager=str(self.prep.ckpt)), split)
            except RuntimeError as e:  # as for ours: recorded, and the sitting goes on (runtime_gap: NaN)
                extra.setdefault("eager_limit_errors", []).append(str(e)[-2000:])
                print(f"{self.model:<12.12} {'eager fp32':<19} {split!s:<4} in-process limit #{round_ + 1} failed: "
                      f"{str(e)[-300:]}", flush=True)
                return
            runs = extra.setdefault("eager_limits", [])
            runs.append(eager)
            extra["eager_limit"] = {**eager, "img_s": statistics.median(x["img_s"] for x in runs),
                                    "runs": [x["img_s"] for x in runs], "split": str(split), "split_of": whose}
            print(f"{self.model:<12.12} {'eager fp32':<19} {split!s:<4} in-process limit #{round_ + 1} "
                  f"{eager['img_s']:.1f} img/s", flush=True)

    def tta_breakdown(self) -> dict:
        extra: dict = {}
        flip = next((c for c in self.configs if c.tta == "flip" and not c.adaptive and self.results[c.name]["split"]),
                    None)
        if flip is not None:
            split, info = Split(**self.results[flip.name]["split"]), self.manifest["variants"][flip.variant]
            threads = torch.get_num_threads()
            try:
                extra["tta_breakdown"] = breakdown(
                    str(self.prep.export_dir / info["files"][0]), payloads=self.job(flip).payloads,
                    crop_size=self.prep.spec.input_size, resize_size=self.prep.spec.resize_size,
                    threads=split.threads, batch=self.plan.batch, min_run_time=self.plan.tta_seconds,
                    rounds=self.plan.tta_rounds)
            finally:
                torch.set_num_threads(threads)
            b = extra["tta_breakdown"]
            print(f"{self.model:<12.12} flip TTA breakdown ({split.threads} thread(s), batch {b['batch']}): "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in b["ms"].items())
                  + f"; forward 2n/n {b['forward_2n_over_n']:.2f}, predict flip/none {b['predict_flip_over_none']:.2f}",
                  flush=True)
        return extra

    def repeats(self, extra: dict) -> None:
        plan = self.plan
        (first_set, first), *others = self.payloads.items()
        live = [c for c in self.configs if c.name in self.servers]
        if plan.settle:  # TorchServe's JIT at steady state, as in a server that has been up a while
            for c in live:
                self.servers[c.name].run(first, plan.top_users, plan.settle, tag=f"{c.name}-settle", quiet=True)
        for i in range(plan.repeats):  # each round begins one configuration later: none always follows the limits
            for c in rotated(live, i):
                self.measure(c, first_set, first, plan.top_users, plan.duration, repeat=i)
            self.limit_round(extra, i)
        in_sets = [c for c in live if c.name in plan.set_configs]
        if others and plan.warmup:  # each set's first run was a cold one (phone12mp: 16.2 vs 18.1 img/s)
            for c in in_sets:
                for set_name, folder in others:
                    self.servers[c.name].run(folder, plan.top_users, plan.warmup, tag=f"{c.name}-{set_name}-warmup",
                                             quiet=True)
        paired = [(PAIRED_SET, first)] if others else []  # small/12mp: the first set in the same rounds
        for i in range(plan.repeats):
            for set_name, folder in [*paired, *others]:
                for c in rotated(in_sets, i):
                    if set_name != PAIRED_SET or c.name == "ours_fp32":
                        self.measure(c, set_name, folder, plan.top_users, plan.duration, repeat=i)
        for users in plan.low_users:
            for c in live:
                self.measure(c, first_set, first, users, plan.low_duration, repeat=0)

    def measure(self, c: Config, set_name: str, folder: Path, users: int, seconds: int, *, repeat: int) -> None:
        served = self.servers[c.name]
        r = served.run(folder, users, seconds, tag=f"{served.name}-{set_name}-{users}-{repeat}", set=set_name,
                       phase="measure", repeat=repeat)
        self.results[c.name]["runs"].append(r)
