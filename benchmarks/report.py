"""What ``make bench`` writes and prints: the tables and ratios, the plots, the machine it ran on.

``report`` makes, from one model's sitting (``benchmarks.sitting``), the Markdown tables -- the split
search (img/s of every configuration at every grid point), and per configuration its split, gate, its
in-process limit in the same split, the medians [min-max] of the repeated runs at the highest user
count (gated variants and speed-only ones in separate, labelled columns), the other payload sets and the
lower user counts -- and the ``ratios: ...`` line, every ratio from medians of this sitting:

* ``ours/stock``: ours_fp32 / stock (both at their searched best split), first payload set, top users;
* ``runtime_gap``: in-process ONNX Runtime fp32 (ours_fp32's split) / in-process eager fp32 (stock's split:
  each runtime where its served side runs, as in ``ours/stock``; ours_fp32's when stock is not run);
* ``best_gated/stock``: the fastest non-TTA ours variant that is gated (``benchmarks.gates``) / stock;
* ``served/limit``: the worst over the ours configurations of served / in-process limit (same split);
* ``flip_tta_cost``, ``adaptive_tta_cost``: ours_fp32 / the TTA configuration (same split); the extra
  ``flip_tta_cost_bf16``: ours_ov_bf16 / ours_ov_bf16_flip;
* ``small/12mp``: the decode-bound model's ours_fp32, 500x375 / 12 MP, both measured in the same rounds
  (:data:`PAIRED_SET`); NaN when that model was not run; ``ours/stock_12mp``: 12 MP set;
* extra keys: ``best_speed_only/stock`` (ungated variants, never in best_gated), ``ours/stock_mixed``,
  ``p99<stock`` (how many ours configurations have a median p99 below stock's with no failed request: a
  configuration that answers errors fast must not count as fast) and the chosen splits.

``report`` also carries where each configuration's served/limit goes (``benchmarks.accounting``).
``plots`` draws the medians against users and the latency distribution at the highest load;
``machine`` describes the CPU and ``isa_class`` names its class.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import psutil

from benchmarks.accounting import accounting_table

FIRST_SET, PHONE_SET, MIXED_SET = "jpeg500", "phone12mp", "mixed"  # tools.photos' payload sets
# the first set again, measured in the rounds of the other sets (benchmarks.sitting): small/12mp divides runs of
# the same moments, as every other ratio does
PAIRED_SET = f"{FIRST_SET}_paired"
RATIO_KEYS = ("ours/stock", "runtime_gap", "best_gated/stock", "served/limit", "flip_tta_cost",
              "adaptive_tta_cost", "small/12mp", "ours/stock_12mp")
NAN = float("nan")


def _div(a, b) -> float:
    return a / b if a is not None and b not in (None, 0) and not math.isnan(a) and not math.isnan(b) else NAN


def median_of(result: dict | None, set_name: str, users: int) -> float:
    m = (result or {}).get("medians", {}).get(f"{set_name}@{users}")
    return m["img_s"] if m and m["img_s"] is not None else NAN


def _cell(m: dict | None, *, spread: bool = True) -> str:
    if not m or m["img_s"] is None:
        return "-"
    rng = f" [{m['min']:.1f}–{m['max']:.1f}]" if spread and m["n"] > 1 else ""
    lat = f" ({m['p50_ms']:.0f}/{m['p99_ms']:.0f})" if m["p50_ms"] is not None and m["p99_ms"] is not None else ""
    return f"{m['img_s']:.1f}{rng}{lat}"


def ratios(sitting: dict, *, top: int, small: dict | None = None, eager_limit: dict | None = None) -> dict:
    """The ratio values (``RATIO_KEYS`` and the extras) from one model's sitting; ``small``: the sitting of
    the decode-bound model (None: small/12mp is NaN)."""
    by = {r["name"]: r for r in sitting["results"]}
    stock, fp32 = median_of(by.get("stock"), FIRST_SET, top), median_of(by.get("ours_fp32"), FIRST_SET, top)

    def ours(pred):
        return [(r["name"], median_of(r, FIRST_SET, top)) for r in sitting["results"]
                if r["config"]["kind"] == "ours" and r["config"]["tta"] == "none" and pred(r)
                and not math.isnan(median_of(r, FIRST_SET, top))]
    gated = ours(lambda r: r["gate"]["counts"])
    speed_only = ours(lambda r: not r["gate"]["counts"])
    best_gated = max(gated, key=lambda x: x[1], default=(None, NAN))
    best_speed = max(speed_only, key=lambda x: x[1], default=(None, NAN))
    served_limit = {r["name"]: _div(median_of(r, FIRST_SET, top), r["limit_img_s"]) for r in sitting["results"]
                    if r.get("limit_img_s")}
    # the worst configuration: one served without its limit (it failed) leaves the worst unknown, not dropped
    unlimited = [r["name"] for r in sitting["results"] if r["config"]["kind"] == "ours" and r.get("runs")
                 and not r.get("limit_img_s")]
    eager = (eager_limit or sitting.get("eager_limit") or {}).get("img_s")
    fp32_limit = by.get("ours_fp32", {}).get("limit_img_s")
    small_by = {r["name"]: r for r in (small or {}).get("results", [])}
    stock_p99 = (by.get("stock") or {}).get("medians", {}).get(f"{FIRST_SET}@{top}", {}).get("p99_ms")
    p99 = [(m["p99_ms"], m.get("failures", 0)) for r in sitting["results"]
           if r["config"]["kind"] == "ours" and (m := r.get("medians", {}).get(f"{FIRST_SET}@{top}"))]
    values = {
        "ours/stock": _div(fp32, stock),
        "runtime_gap": _div(fp32_limit, eager),
        "best_gated/stock": _div(best_gated[1], stock),
        "served/limit": NAN if unlimited else min(served_limit.values(), default=NAN),
        "flip_tta_cost": _div(fp32, median_of(by.get("ours_fp32_flip"), FIRST_SET, top)),
        "adaptive_tta_cost": _div(fp32, median_of(by.get("ours_fp32_adaptive"), FIRST_SET, top)),
        "small/12mp": _div(median_of(small_by.get("ours_fp32"), PAIRED_SET, top),
                           median_of(small_by.get("ours_fp32"), PHONE_SET, top)),
        "ours/stock_12mp": _div(median_of(by.get("ours_fp32"), PHONE_SET, top), median_of(by.get("stock"), PHONE_SET, top)),
        "best_speed_only/stock": _div(best_speed[1], stock),
        "ours/stock_mixed": _div(median_of(by.get("ours_fp32"), MIXED_SET, top), median_of(by.get("stock"), MIXED_SET, top)),
        "flip_tta_cost_bf16": _div(median_of(by.get("ours_ov_bf16"), FIRST_SET, top),
                                   median_of(by.get("ours_ov_bf16_flip"), FIRST_SET, top)),
    }
    return {"values": values, "best_gated": best_gated[0], "best_speed_only": best_speed[0],
            "served_over_limit": served_limit,
            "p99_below_stock": None if stock_p99 is None else
            f"{sum(p < stock_p99 and not failed for p, failed in p99 if p is not None)}/{len(p99)}",
            "splits": {n: f"{r['split']['workers']}x{r['split']['threads']}" for n, r in by.items() if r.get("split")}}


def ratios_line(isa: str, r: dict) -> str:
    v = r["values"]
    main = " ".join(f"{k}={v[k]:.2f}" for k in RATIO_KEYS)
    extra = (f" best_speed_only/stock={v['best_speed_only/stock']:.2f} ours/stock_mixed={v['ours/stock_mixed']:.2f}"
             f" flip_tta_cost_bf16={v['flip_tta_cost_bf16']:.2f}")
    if r["p99_below_stock"] is not None:
        extra += f" p99<stock={r['p99_below_stock']}"
    if "stock" in r["splits"]:
        extra += f" stock_split={r['splits']['stock']}"
    if "ours_fp32" in r["splits"]:
        extra += f" ours_split={r['splits']['ours_fp32']}"
    return f"ratios: isa={isa} {main}{extra}"


def report(sitting: dict, *, top: int, low: list[int], grid: list[str], small: dict | None = None) -> dict:
    """The tables and the ``ratios:`` line of one model's sitting (see the module docstring)."""
    results = sitting["results"]
    others = list(dict.fromkeys(x["set"] for r in results for x in r["runs"] if x["set"] != FIRST_SET))
    search = ["| configuration | " + " | ".join(f"{g} img/s" for g in grid) + " | chosen |",
              "|---|" + "---|" * (len(grid) + 1)]
    for r in results:
        got = {e["split"]: (f"{e['img_s']:.1f}" if "img_s" in e else "failed") for e in r["search"]}
        chosen = f"{r['split']['workers']}x{r['split']['threads']}" if r["split"] else "-"
        search.append(f"| {r['name']} | " + " | ".join(got.get(g, "-") for g in grid)
                      + f" | {chosen}{'' if r['split_source'] in (None, 'search') else ' (of ' + r['split_source'] + ')'} |")
    head = (f"| configuration | split | gate | in-process limit img/s (same split, median of the rounds) | served/limit | {top} users img/s, "
            f"gated: median [min–max] (p50/p99 ms) | {top} users img/s, SPEED-ONLY (not gated) | "
            + "".join(f"{s} {top} users img/s | " for s in others)
            + "".join(f"{u} user(s) img/s | " for u in low) + "failures |")
    lines = [head, "|---|---|---|---|---|---|---|" + "---|" * (len(others) + len(low)) + "---|"]
    for r in results:
        m = r.get("medians", {})
        main = _cell(m.get(f"{FIRST_SET}@{top}"))
        counted = r["gate"]["counts"] or r["config"]["kind"] == "stock"
        lim = f"{r['limit_img_s']:.1f}" if r.get("limit_img_s") else "-"
        if len(r.get("limits") or []) > 1:  # one per round of the repeats: median [min–max]
            lim += f" [{min(x['img_s'] for x in r['limits']):.1f}–{max(x['img_s'] for x in r['limits']):.1f}]"
        sl = _div(median_of(r, FIRST_SET, top), r.get("limit_img_s"))
        split = f"{r['split']['workers']}x{r['split']['threads']}" if r["split"] else "-"
        lines.append(f"| {r['name']} | {split} | {r['gate']['label']} | {lim} | "
                     f"{'-' if math.isnan(sl) else f'{sl:.2f}'} | {main if counted else '-'} | "
                     f"{'-' if counted else main} | "
                     + "".join(f"{_cell(m.get(f'{s}@{top}'))} | " for s in others)
                     + "".join(f"{_cell(m.get(f'{FIRST_SET}@{u}'), spread=False)} | " for u in low)
                     + f"{sum(x['failures'] for x in r['runs'])} |")
    values = ratios(sitting, top=top, small=small)
    cpu_table, cpu = accounting_table(results, top=top, set_name=FIRST_SET)
    return {"table": "\n".join(lines), "search_table": "\n".join(search), "ratios": ratios_line(isa_class(), values),
            **values, "at_users": top, "accounting": cpu, "accounting_table": cpu_table}


def plots(results: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        pts = sorted((int(k.split("@")[1]), m["img_s"]) for k, m in r.get("medians", {}).items()
                     if k.startswith(FIRST_SET + "@") and m["img_s"] is not None)
        if pts:
            ax.plot([u for u, _ in pts], [v for _, v in pts], marker="o", label=r["name"])
    ax.set(xlabel="concurrent users (closed loop)", ylabel="images/s (median)", title="Throughput vs users", xscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-throughput.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        runs = [x for x in r["runs"] if x["set"] == FIRST_SET]
        if not runs:
            continue
        top = max(runs, key=lambda x: (x["users"], x["img_s"]))
        keys = list(top["percentiles"])
        ax.plot(keys, [top["percentiles"][k] for k in keys], marker=".", label=f"{r['name']} ({top['users']} users)")
    ax.set(xlabel="percentile", ylabel="latency ms", title="Latency distribution at the highest load", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-latency.png"), dpi=120)
    plt.close("all")
    return [str(out.with_name(out.name + s)) for s in ("-throughput.png", "-latency.png")]


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_class(flags: set[str] | None = None) -> str:
    """The class of machine a figure belongs to: AMX, AVX512_BF16, AVX512 or AVX2 (the speed of the
    graphs differs by 2x or more between them); OTHER for anything else (an ARM machine, whose
    /proc/cpuinfo has no x86 flags, or an x86 without AVX2), whose figures no target tier covers."""
    flags = cpu_flags() if flags is None else flags
    if "amx_tile" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    if "avx512f" in flags:
        return "AVX512"
    return "AVX2" if "avx2" in flags else "OTHER"


def machine() -> dict:
    import platform

    flags = cpu_flags()
    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "processor": platform.processor() or platform.machine(),
            "isa_class": isa_class(flags), "isa": sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx2", "avx512f")))}
