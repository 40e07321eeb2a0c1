"""Soak test: a TorchServe of its own at saturation for a long time; fails on errors, latency creep or
worker memory growth.

    python -m scripts.soak --duration 600 --users 16 --out logs/soak

The model: ``--archive PATH`` if given; otherwise ``model_store/fmnist.mar`` when it exists (the
demo's model, what ``make serve`` serves); otherwise a small archive built here the way the
benchmark builds its small model (``benchmarks.bench.prepare``: a random-initialised cbam_resnet,
32 px, 10 classes, exported to ONNX), served with batch 8, one worker.

The load: ``locustfile.py`` headless, ``--users`` closed-loop users spawned at once, no wait time
(saturation), posting real photos (``benchmarks.bench.photos``: foolbox's ImageNet JPEGs and
matplotlib's grace_hopper.jpg as 500x375 JPEG q90), with ``--csv-full-history``. Every second the
worker processes' RSS (psutil over the Java process's children) and the Java frontend's RSS are
sampled.

Written to ``--out``: ``soak.csv`` (one row per second: throughput over the last 5 s, failures,
p50/p99 of the last 10 s as locust reports them, worker and frontend RSS), ``soak.png`` (throughput, p99 and worker RSS
over time), ``summary.json`` (the figures and the verdict), the raw locust CSVs and the tail of the
server's logs. Exit status 1 when:

* any request failed (locust counts a non-200 or a malformed body as a failure);
* p99 in the last window > ``--p99-ratio`` (1.5) x p99 in the first window after warm-up;
* mean worker RSS in the last window > (1 + ``--rss-growth``) x (10%) the first window's after warm-up;
* a worker process was replaced during the run (a crash or a timeout restart).

Windows scale with the run: window = warm-up = duration / 10, between 10 s and 60 s (a 600 s run
compares the second minute with the last minute; a 60 s run 20-30 s with 50-60 s). A window's p99 is
the median of locust's per-second "p99 of the last 10 s" samples inside it, so it reflects requests
of that window only (each sample's 10 s lie inside the window or the 10 s before it).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil

from scripts.ts_server import REPO, TorchServe

DEFAULT_ARCHIVE = REPO / "model_store" / "fmnist.mar"
CSV_COLUMNS = ["t_s", "users", "rps", "failures_per_s", "p50_ms", "p99_ms", "total_requests", "total_failures",
               "worker_rss_mb", "java_rss_mb", "workers", "worker_pids"]


# --- model and payloads ---------------------------------------------------------------------------
def model_name_of(archive: Path) -> str:
    with zipfile.ZipFile(archive) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]


def choose_archive(args, work: Path, payload_dir: Path) -> tuple[Path, str, str]:
    """(archive, model name, a sentence saying which model and why)."""
    if args.archive:
        archive = Path(args.archive).resolve()
        return archive, args.model_name or model_name_of(archive), f"{archive} (given with --archive)"
    if DEFAULT_ARCHIVE.is_file():
        return DEFAULT_ARCHIVE, args.model_name or model_name_of(DEFAULT_ARCHIVE), \
            f"{DEFAULT_ARCHIVE} (the demo's model: it exists)"
    from benchmarks.bench import prepare
    from export.archive import build_archive
    prep = prepare("cbam_resnet", payload_dir, work)
    archive = build_archive(prep["export_dir"], variant="onnx", name="soak", model_store=work / "model_store",
                            batch_size=8, max_batch_delay_ms=10, workers=1, response_timeout_s=60, topk=5, tta="none")
    return archive, "soak", (f"{archive} (built here: no {DEFAULT_ARCHIVE.relative_to(REPO)}; random-initialised "
                             "cbam_resnet 32 px, 10 classes, ONNX Runtime, batch 8, 1 worker)")


# --- sampling -------------------------------------------------------------------------------------
class RssSampler(threading.Thread):
    """Every ``interval`` s: total RSS of the worker processes (children of the Java PID running
    ``model_service_worker``), the Java frontend's RSS and the worker PIDs."""

    def __init__(self, java_pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.java = psutil.Process(java_pid)
        self.interval = interval
        self.samples: list[dict] = []
        self._done = threading.Event()

    def sample(self) -> dict:
        workers = []
        try:
            java_rss = self.java.memory_info().rss
            children = self.java.children(recursive=True)
        except psutil.Error:
            return {"time": time.time(), "worker_rss": 0, "java_rss": 0, "pids": []}
        for p in children:
            try:
                if any("model_service_worker" in a for a in p.cmdline()):
                    workers.append((p.pid, p.memory_info().rss))
            except psutil.Error:
                pass
        return {"time": time.time(), "worker_rss": sum(r for _, r in workers), "java_rss": java_rss,
                "pids": sorted(pid for pid, _ in workers)}

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append(self.sample())
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def run_locust(url: str, model: str, images: Path, users: int, duration: int, prefix: Path, log: Path) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "locustfile.py"), "--headless", "-u", str(users),
           "-r", str(users), "-t", f"{duration}s", "--host", url, "--images", str(images), "--model-name", model,
           "--csv", str(prefix), "--csv-full-history", "--only-summary", "--loglevel", "WARNING",
           "--stop-timeout", "10"]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=duration + 120).returncode


# --- merging, judging, plotting --------------------------------------------------------------------
def _num(value: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v


def merge(history_csv: Path, samples: list[dict], t0: float) -> list[dict]:
    """One row per locust history second (the Aggregated row), with the RSS sample nearest in time."""
    rows = []
    with open(history_csv) as f:
        for r in csv.DictReader(f):
            if r["Name"] != "Aggregated":
                continue
            t = int(r["Timestamp"]) - t0
            near = min(samples, key=lambda s: abs(s["time"] - t0 - t)) if samples else None
            p50, p99 = _num(r.get("50%")), _num(r.get("99%"))
            rows.append({"t_s": round(t, 1), "users": int(r["User Count"]), "rps": 0.0,
                         "failures_per_s": _num(r["Failures/s"]) or 0.0,
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


def windows(duration: float) -> tuple[float, float]:
    """(warm-up, window) in seconds for a run of ``duration`` seconds."""
    w = min(60.0, max(10.0, duration / 10))
    return w, w


def evaluate(rows: list[dict], *, duration: float, users: int, p99_ratio: float = 1.5,
             rss_growth: float = 0.10, samples: list[dict] | None = None) -> dict:
    """The verdict from the per-second rows (as written to soak.csv: values may be strings)."""
    warmup, window = windows(duration)

    def col(row, key):
        v = row.get(key)
        return None if v in (None, "") else float(v)

    full = [r for r in rows if int(float(r["users"])) == users and col(r, "t_s") <= duration]
    first_lo, first_hi = warmup + 10, warmup + 10 + window  # p99 samples cover the 10 s before them
    last_lo, last_hi = duration - window, duration
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=600, help="seconds of load")
    p.add_argument("--users", type=int, default=16, help="closed-loop locust users (no wait time)")
    p.add_argument("--out", default=str(REPO / "logs" / "soak"), help="output folder")
    p.add_argument("--archive", help="a .mar to serve (default: model_store/fmnist.mar, else one built here)")
    p.add_argument("--model-name", help="model name (default: the archive's)")
    p.add_argument("--images", help="payload folder (default: real photos as 500x375 JPEG, made under OUT/work)")
    p.add_argument("--p99-ratio", type=float, default=1.5, help="largest allowed last/first window p99 ratio")
    p.add_argument("--rss-growth", type=float, default=0.10, help="largest allowed worker RSS growth (fraction)")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between RSS samples")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.images:
        images = Path(args.images).resolve()
    else:
        from benchmarks.bench import photos
        images = photos(work / "payloads")
    archive, model, why = choose_archive(args, work, images)
    print(f"soak: serving {why} as {model!r}; payloads {images} "
          f"({sum(1 for q in images.rglob('*') if q.is_file())} files); {args.users} users for {args.duration} s",
          flush=True)
    prefix = out / "locust"
    for old in out.glob("locust_*.csv"):
        old.unlink()
    with TorchServe(model_store=archive.parent, models=f"{model}={archive.name}") as server:
        print(f"TorchServe PID {server.pid} at {server.url}", flush=True)
        sampler = RssSampler(server.pid, args.sample_interval)
        sampler.start()
        t0 = time.time()
        try:
            rc = run_locust(server.url, model, images, args.users, args.duration, prefix, out / "locust.log")
        finally:
            sampler.stop()
            for name in ("ts_log.log", "model_log.log"):
                src = server.log_dir / name
                if src.is_file():
                    with open(src, "rb") as f:
                        f.seek(max(0, src.stat().st_size - 200_000))
                        (out / f"server-{name}").write_bytes(f.read())
    history = Path(f"{prefix}_stats_history.csv")
    if not history.is_file():
        print(f"locust wrote no stats history (exit status {rc}):\n{(out / 'locust.log').read_text()[-3000:]}")
        return 1
    rows = merge(history, sampler.samples, t0)
    write_csv(rows, out / "soak.csv")
    with open(out / "rss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "worker_rss_mb", "java_rss_mb", "worker_pids"])
        for s in sampler.samples:
            w.writerow([round(s["time"] - t0, 2), round(s["worker_rss"] / 2**20, 1), round(s["java_rss"] / 2**20, 1),
                        " ".join(map(str, s["pids"]))])
    summary = evaluate(rows, duration=args.duration, users=args.users, p99_ratio=args.p99_ratio,
                       rss_growth=args.rss_growth, samples=sampler.samples)
    summary.update(model=model, archive=str(archive), model_choice=why, locust_exit_code=rc,
                   machine=f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                   started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(rows, summary, out / "soak.png")
    print(report(summary))
    print(f"files: {out / 'soak.csv'}, {out / 'soak.png'}, {out / 'summary.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
