"""The soak's results: per-second rows (``soak.csv``), the verdict, the plot and the printed report.

``merge`` joins locust's per-second history with the RSS samples; ``evaluate`` judges the rows by
the criteria ``python -m scripts.soak --help`` describes (failures, p99 creep between the first window
after warm-up and the last one, worker RSS growth, workers replaced), with windows that scale with the
run (``windows``); ``plot``, ``write_csv`` and ``report`` write and print what was judged.
"""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

from tools.locust import number

CSV_COLUMNS = ["t_s", "users", "rps", "failures_per_s", "p50_ms", "p99_ms", "total_requests", "total_failures",
               "worker_rss_mb", "java_rss_mb", "workers", "worker_pids"]


def merge(history_rows: list[dict], samples: list[dict], t0: float) -> list[dict]:
    """One row per locust history second (``tools.locust.history``), with the RSS sample nearest in time."""
    rows = []
    for r in history_rows:
        t = int(r["Timestamp"]) - t0
        near = min(samples, key=lambda s: abs(s["time"] - t0 - t)) if samples else None
        p50, p99 = number(r.get("50%")), number(r.get("99%"))
        rows.append({"t_s": round(t, 1), "users": int(r["User Count"]), "rps": 0.0,
                     "failures_per_s": number(r["Failures/s"]) or 0.0,
                     "p50_ms": p50 if p50 else "", "p99_ms": p99 if p99 else "",  # 0: no 10 s window yet
                     "total_requests": int(r["Total Request Count"]),
                     "total_failures": int(r["Total Failure Count"]),
                     "worker_rss_mb": round(near["worker_rss"] / 2**20, 1) if near else "",
                     "java_rss_mb": round(near["java_rss"] / 2**20, 1) if near else "",
                     "workers": len(near["pids"]) if near else "",
                     "worker_pids": " ".join(map(str, near["pids"])) if near else ""})
    for i, row in enumerate(rows):  # throughput: answers per second over the last 5 s, from the cumulative count
        j = max(0, i - 5)
        dt = row["t_s"] - rows[j]["t_s"]
        row["rps"] = round((row["total_requests"] - rows[j]["total_requests"]) / dt, 2) if dt > 0 else 0.0
    return rows


P99_SPAN_S = 10  # locust's per-second p99 covers the 10 s before it


def windows(duration: float) -> tuple[float, float]:
    """(warm-up, window) in seconds for a run of ``duration`` seconds."""
    w = min(60.0, max(10.0, duration / 10))
    return w, w


def p99_windows(duration: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The first window after warm-up and the last one whose p99 samples are compared, in seconds: the first
    starts :data:`P99_SPAN_S` after the warm-up, so that its samples cover requests of the loaded run only."""
    warmup, window = windows(duration)
    return (warmup + P99_SPAN_S, warmup + P99_SPAN_S + window), (duration - window, duration)


def shortest_duration() -> int:
    """The shortest run (whole seconds) whose two compared windows do not overlap: 40 s (20-30 s against 30-40 s)."""
    return next(d for d in range(1, 10_000) if p99_windows(d)[0][1] <= p99_windows(d)[1][0])


def evaluate(rows: list[dict], *, duration: float, users: int, p99_ratio: float = 1.5,
             rss_growth: float = 0.10, samples: list[dict] | None = None, final: dict | None = None,
             locust_exit_code: int | None = None) -> dict:
    """The verdict from the per-second rows (as written to soak.csv: values may be strings). ``final``: the whole
    run's requests and failures (``tools.locust.summary``); the per-second rows end up to a second before locust
    stops and miss what its stop timeout answered. ``locust_exit_code``: locust's own (1 on any failure)."""
    warmup, window = windows(duration)

    def col(row, key):
        v = row.get(key)
        return None if v in (None, "") else float(v)

    full = [r for r in rows if int(float(r["users"])) == users and col(r, "t_s") <= duration]
    (first_lo, first_hi), (last_lo, last_hi) = p99_windows(duration)
    p99_first = [col(r, "p99_ms") for r in full if first_lo <= col(r, "t_s") <= first_hi and col(r, "p99_ms")]
    p99_last = [col(r, "p99_ms") for r in full if last_lo <= col(r, "t_s") <= last_hi and col(r, "p99_ms")]
    rss_first = [col(r, "worker_rss_mb") for r in rows if warmup <= col(r, "t_s") <= warmup + window
                 and col(r, "worker_rss_mb")]
    rss_last = [col(r, "worker_rss_mb") for r in rows if last_lo <= col(r, "t_s") <= last_hi
                and col(r, "worker_rss_mb")]
    pid_sets = {r["worker_pids"] for r in rows if r.get("worker_pids")}
    if samples:
        pid_sets |= {" ".join(map(str, s["pids"])) for s in samples if s["pids"]}
    last = rows[-1] if rows else {}
    total, failures = int(float(last.get("total_requests", 0) or 0)), int(float(last.get("total_failures", 0) or 0))
    if final is not None:
        total, failures = max(total, int(final["requests"])), max(failures, int(final["failures"]))
    result = {
        "duration_s": duration, "users": users, "warmup_s": warmup, "window_s": window,
        "requests": total, "failures": failures,
        "throughput_rps": round(total / duration, 2) if duration else None,
        "rps_first_window": _mean([col(r, "rps") for r in full if warmup + 5 <= col(r, "t_s") <= warmup + window]),
        "rps_last_window": _mean([col(r, "rps") for r in full if last_lo + 5 <= col(r, "t_s") <= last_hi]),
        "p99_first_ms": statistics.median(p99_first) if p99_first else None,
        "p99_last_ms": statistics.median(p99_last) if p99_last else None,
        "p99_max_ms": max((col(r, "p99_ms") for r in full if col(r, "p99_ms")), default=None),
        "first_window_s": [first_lo, first_hi], "rss_first_window_s": [warmup, warmup + window],
        "last_window_s": [last_lo, last_hi],
        "worker_rss_first_mb": _mean(rss_first), "worker_rss_last_mb": _mean(rss_last),
        "worker_rss_max_mb": max((col(r, "worker_rss_mb") for r in rows if col(r, "worker_rss_mb")), default=None),
        "java_rss_first_mb": _mean([col(r, "java_rss_mb") for r in rows if warmup <= col(r, "t_s") <= warmup + window
                                    and col(r, "java_rss_mb")]),
        "java_rss_last_mb": _mean([col(r, "java_rss_mb") for r in rows if last_lo <= col(r, "t_s") <= last_hi
                                   and col(r, "java_rss_mb")]),
        "worker_pid_sets": sorted(pid_sets),
    }
    result["p99_ratio"] = (round(result["p99_last_ms"] / result["p99_first_ms"], 3)
                           if result["p99_first_ms"] and result["p99_last_ms"] else None)
    result["worker_rss_growth"] = (round(result["worker_rss_last_mb"] / result["worker_rss_first_mb"] - 1, 4)
                                   if result["worker_rss_first_mb"] and result["worker_rss_last_mb"] else None)
    problems = []
    if total == 0:
        problems.append("no request was answered")
    if failures:
        problems.append(f"{failures} failed requests")
    elif locust_exit_code not in (None, 0):
        problems.append(f"locust exited with status {locust_exit_code} (see locust.log)")
    if result["p99_ratio"] is None:
        problems.append("not enough latency samples to compare the first and last windows")
    elif result["p99_ratio"] > p99_ratio:
        problems.append(f"p99 grew {result['p99_ratio']:.2f}x (limit {p99_ratio}x)")
    if result["worker_rss_growth"] is None:
        problems.append("not enough worker RSS samples to compare the first and last windows")
    elif result["worker_rss_growth"] > rss_growth:
        problems.append(f"worker RSS grew {100 * result['worker_rss_growth']:.1f}% (limit {100 * rss_growth:.0f}%)")
    if len(pid_sets) > 1:
        problems.append(f"worker processes were replaced during the run: {sorted(pid_sets)}")
    result["limits"] = {"p99_ratio": p99_ratio, "worker_rss_growth": rss_growth}
    result["problems"] = problems
    result["passed"] = not problems
    return result


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 2) if values else None


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(float(r["t_s"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    spans = {"rps": summary["rss_first_window_s"], "p99_ms": summary["first_window_s"],
             "worker_rss_mb": summary["rss_first_window_s"]}
    for ax, key, label in zip(axes, ("rps", "p99_ms", "worker_rss_mb"),
                              ("throughput (req/s)", "p99 latency, last 10 s (ms)", "RSS (MB)")):
        ax.plot(*series(key), lw=1, label="worker processes" if key == "worker_rss_mb" else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for lo, hi in (spans[key], summary["last_window_s"]):  # the windows compared
            ax.axvspan(lo, hi, color="tab:orange", alpha=0.1)
    axes[2].plot(*series("java_rss_mb"), lw=1, ls="--", label="Java frontend")
    axes[2].legend(fontsize=8)
    axes[-1].set_xlabel("seconds since the load started")
    verdict = "PASS" if summary["passed"] else "FAIL: " + "; ".join(summary["problems"])
    fig.suptitle(f"soak: {summary['users']} users, {summary['duration_s']:.0f} s, {summary['requests']} requests, "
                 f"{summary['failures']} failures\n{verdict}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def report(summary: dict) -> str:
    s = summary

    def f(v, fmt="{:.0f}"):
        return "n/a" if v is None else fmt.format(v)
    return "\n".join([
        f"soak: {s['duration_s']:.0f} s, {s['users']} users, model {s.get('model', '?')}",
        f"  requests {s['requests']} ({f(s['throughput_rps'], '{:.1f}')}/s; first window "
        f"{f(s['rps_first_window'], '{:.1f}')}/s, last {f(s['rps_last_window'], '{:.1f}')}/s), "
        f"failures {s['failures']}",
        f"  p99 first window {s['first_window_s']} s: {f(s['p99_first_ms'])} ms, last {s['last_window_s']} s: "
        f"{f(s['p99_last_ms'])} ms -> ratio {f(s['p99_ratio'], '{:.2f}')} (limit {s['limits']['p99_ratio']}); "
        f"max {f(s['p99_max_ms'])} ms",
        f"  worker RSS in {s['rss_first_window_s']} s {f(s['worker_rss_first_mb'], '{:.1f}')} MB, last window "
        f"{f(s['worker_rss_last_mb'], '{:.1f}')} MB -> growth "
        f"{f(None if s['worker_rss_growth'] is None else 100 * s['worker_rss_growth'], '{:+.1f}')}% "
        f"(limit {100 * s['limits']['worker_rss_growth']:.0f}%); Java frontend {f(s['java_rss_first_mb'])} -> "
        f"{f(s['java_rss_last_mb'])} MB",
        "  PASS" if s["passed"] else "  FAIL: " + "; ".join(s["problems"]),
    ])
