"""What ``make bench`` writes and prints: the table and ratios, the plots, the machine it ran on.

``report`` makes the Markdown table (in-process limit, img/s with p50/p99 at each user count,
failures) and the ``ratios: ...`` line from the results of one model; ``plots`` draws throughput
against users and the latency distribution at the highest load; ``machine`` describes the CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil


def report(results: list[dict], users: list[int], threshold: float) -> dict:
    top = max(users)
    at = {r["name"]: next(x for x in r["runs"] if x["users"] == top) for r in results}
    lines = ["| configuration | in-process limit img/s | " + " | ".join(f"{u} users img/s (p50/p99 ms)" for u in users)
             + " | failures |", "|---|---|" + "---|" * len(users) + "---|"]
    for r in results:
        cells = [f"{x['img_s']:.1f} ({x['p50_ms']:.0f}/{x['p99_ms']:.0f})" for x in r["runs"]]
        lim = f"{r['limit_img_s']:.1f}" if r["limit_img_s"] else "-"
        lines.append(f"| {r['name']} | {lim} | " + " | ".join(cells) + f" | {sum(x['failures'] for x in r['runs'])} |")

    def get(name):
        return at[name]["img_s"] if name in at else float("nan")
    stock, fp32 = get("stock"), get("ours_fp32")
    best = max((get(n) for n in at if n.startswith("ours") and "flip" not in n and "adaptive" not in n), default=float("nan"))
    lim = next((r["limit_img_s"] for r in results if r["name"] == "ours_fp32"), None) or float("nan")
    ratios = (f"ratios: ours/stock={fp32 / stock:.2f} best/stock={best / stock:.2f} served/limit={fp32 / lim:.2f} "
              f"flip_tta_cost={fp32 / get('ours_fp32_flip'):.2f} adaptive_tta_cost={fp32 / get('ours_fp32_adaptive'):.2f}")
    return {"table": "\n".join(lines), "ratios": ratios, "at_users": top}


def plots(results: list[dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([x["users"] for x in r["runs"]], [x["img_s"] for x in r["runs"]], marker="o", label=r["name"])
    ax.set(xlabel="concurrent users (closed loop)", ylabel="images/s", title="Throughput vs users", xscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-throughput.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        top = max(r["runs"], key=lambda x: x["users"])
        keys = list(top["percentiles"])
        ax.plot(keys, [top["percentiles"][k] for k in keys], marker=".", label=f"{r['name']} ({top['users']} users)")
    ax.set(xlabel="percentile", ylabel="latency ms", title="Latency distribution at the highest load", yscale="log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-latency.png"), dpi=120)
    return [str(out.with_name(out.name + s)) for s in ("-throughput.png", "-latency.png")]


def machine() -> dict:
    import platform

    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30),
            "processor": platform.processor() or platform.machine(),
            "isa": sorted(f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx2", "avx512f")))}
