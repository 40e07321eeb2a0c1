"""What ``make bench`` writes and prints: the table and ratios, the plots, the machine it ran on.

``report`` makes the Markdown table (in-process limit, img/s with p50/p99 at each user count on the
500x375 set and at the highest on the 12 MP and mixed sets, failures) and the ``ratios: ...`` line
from the results of one model (``small/12mp`` from the decode-bound model's); ``plots`` draws throughput
against users and the latency distribution at the highest load; ``machine`` describes the CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil

FIRST_SET, PHONE_SET = "jpeg500", "phone12mp"  # tools.photos' payload sets: the one at every user count, 12 MP


def _at(results: list[dict], set_name: str, users: int) -> dict[str, dict]:
    """``{configuration: its run}`` on payload set ``set_name`` at ``users`` (runs without a set: the first)."""
    out = {}
    for r in results:
        run = next((x for x in r["runs"] if x.get("set", FIRST_SET) == set_name and x["users"] == users), None)
        if run is not None:
            out[r["name"]] = run
    return out


def report(results: list[dict], users: list[int], threshold: float, *, small_model: list[dict] | None = None) -> dict:
    """The table (one row per configuration, the first payload set at every user count, the other sets at
    the highest) and the ``ratios:`` line; ``small_model``: the results of the decode-bound model whose
    ``small/12mp`` is printed (default: these)."""
    top = max(users)
    others = list(dict.fromkeys(x["set"] for r in results for x in r["runs"] if x.get("set", FIRST_SET) != FIRST_SET))
    lines = ["| configuration | in-process limit img/s | " + " | ".join(f"{u} users img/s (p50/p99 ms)" for u in users)
             + "".join(f" | {s} {top} users img/s (p50/p99 ms)" for s in others) + " | failures |",
             "|---|---|" + "---|" * (len(users) + len(others)) + "---|"]
    for r in results:
        cell = {(x.get("set", FIRST_SET), x["users"]): f"{x['img_s']:.1f} ({x['p50_ms']:.0f}/{x['p99_ms']:.0f})"
                for x in r["runs"]}
        cells = [cell.get((FIRST_SET, u), "-") for u in users] + [cell.get((s, top), "-") for s in others]
        lim = f"{r['limit_img_s']:.1f}" if r["limit_img_s"] else "-"
        lines.append(f"| {r['name']} | {lim} | " + " | ".join(cells) + f" | {sum(x['failures'] for x in r['runs'])} |")

    at = _at(results, FIRST_SET, top)

    def get(name, runs=at):
        return runs[name]["img_s"] if name in runs else float("nan")
    stock, fp32 = get("stock"), get("ours_fp32")
    best = max((get(n) for n in at if n.startswith("ours") and "flip" not in n and "adaptive" not in n), default=float("nan"))
    lim = next((r["limit_img_s"] for r in results if r["name"] == "ours_fp32"), None) or float("nan")
    phone = _at(results, PHONE_SET, top)
    small = _at(small_model or results, FIRST_SET, top), _at(small_model or results, PHONE_SET, top)
    ratios = (f"ratios: isa={isa_class()} ours/stock={fp32 / stock:.2f} best/stock={best / stock:.2f} "
              f"served/limit={fp32 / lim:.2f} flip_tta_cost={fp32 / get('ours_fp32_flip'):.2f} "
              f"adaptive_tta_cost={fp32 / get('ours_fp32_adaptive'):.2f} "
              f"small/12mp={get('ours_fp32', small[0]) / get('ours_fp32', small[1]):.2f} "
              f"ours/stock_12mp={get('ours_fp32', phone) / get('stock', phone):.2f}")
    return {"table": "\n".join(lines), "ratios": ratios, "at_users": top}


def plots(results: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = [(r["name"], [x for x in r["runs"] if x.get("set", FIRST_SET) == FIRST_SET]) for r in results]
    for name, runs in first:
        ax.plot([x["users"] for x in runs], [x["img_s"] for x in runs], marker="o", label=name)
    ax.set(xlabel="concurrent users (closed loop)", ylabel="images/s", title="Throughput vs users", xscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-throughput.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in first:
        top = max(runs, key=lambda x: x["users"])
        keys = list(top["percentiles"])
        ax.plot(keys, [top["percentiles"][k] for k in keys], marker=".", label=f"{name} ({top['users']} users)")
    ax.set(xlabel="percentile", ylabel="latency ms", title="Latency distribution at the highest load", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-latency.png"), dpi=120)
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
    graphs differs by 2x or more between them)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_tile" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    return "AVX512" if "avx512f" in flags else "AVX2"


def machine() -> dict:
    import platform

    flags = cpu_flags()
    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "processor": platform.processor() or platform.machine(),
            "isa_class": isa_class(flags), "isa": sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx2", "avx512f")))}
