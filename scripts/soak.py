"""Soak test: a TorchServe of its own at saturation for a long time; fails on errors, latency creep or
worker memory growth.

    python -m scripts.soak --duration 600 --users 16 --out logs/soak

The model: ``--archive PATH`` if given; otherwise ``model_store/fmnist.mar`` when it exists (the
demo's model, what ``make serve`` serves); otherwise a small archive built here the way the
benchmark builds its models (``tools.models.export_random_model``: a random-initialised cbam_resnet,
32 px, 10 classes, exported to ONNX), served with batch 8, one worker.

The load: ``locustfile.py`` headless, ``--users`` closed-loop users spawned at once, no wait time
(saturation), posting real photos (``tools.photos``: foolbox's ImageNet JPEGs and
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
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil

from inference.cli import UsageError
from inference.cli import run as run_cli
from scripts.soak_verdict import evaluate, merge, plot, report, shortest_duration, write_csv
from tools import REPO
from tools.locust import clear_outputs, final_stats_path, history, locust_command, run_locust
from tools.locust import summary as locust_summary
from tools.processes import worker_processes
from tools.torchserve import TorchServe

DEFAULT_ARCHIVE = REPO / "model_store" / "fmnist.mar"
RESULT_FILES = ("summary.json", "soak.csv", "rss.csv", "soak.png", "locust.log", "server-ts_log.log",
                "server-model_log.log")


# --- model and payloads ---------------------------------------------------------------------------
def model_name_of(archive: Path) -> str:
    try:
        with zipfile.ZipFile(archive) as z:
            return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"]
    except (zipfile.BadZipFile, KeyError, ValueError):
        raise UsageError(f"{archive} is not a .mar archive (write one with `python -m export archive`)") from None


def choose_archive(args, work: Path, payload_dir: Path) -> tuple[Path, str, str]:
    """(archive, model name, a sentence saying which model and why)."""
    if args.archive:
        archive = Path(args.archive).resolve()
        return archive, args.model_name or model_name_of(archive), f"{archive} (given with --archive)"
    if DEFAULT_ARCHIVE.is_file():
        return DEFAULT_ARCHIVE, args.model_name or model_name_of(DEFAULT_ARCHIVE), \
            f"{DEFAULT_ARCHIVE} (the demo's model: it exists)"
    from export.archive import build_archive
    from tools.models import export_random_model
    prep = export_random_model("cbam_resnet", work, calib_data=payload_dir, variants=["onnx"])
    archive = build_archive(prep.export_dir, variant="onnx", name="soak", model_store=work / "model_store",
                            batch_size=8, max_batch_delay=10, workers=1, response_timeout=60, topk=5, tta="none")
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
            children = worker_processes(self.java.pid)
        except psutil.Error:
            return {"time": time.time(), "worker_rss": 0, "java_rss": 0, "pids": []}
        for p in children:
            try:
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
    if args.users < 1 or args.sample_interval <= 0:
        raise UsageError("--sample-interval must be > 0 and --users at least 1")
    if args.duration < shortest_duration():
        raise UsageError(f"--duration must be at least {shortest_duration()} s: the verdict compares a window after "
                         "the warm-up with the last one (10 s each below 100 s), and shorter runs have no two")
    if args.archive and not Path(args.archive).is_file():
        raise UsageError(f"--archive {args.archive}: file not found (a .mar written by `python -m export archive`)")
    if args.images and not Path(args.images).is_dir():
        raise UsageError(f"--images {args.images}: folder not found")
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.images:
        images = Path(args.images).resolve()
    else:
        from tools.photos import write_photos
        images = write_photos(work / "payloads")
    archive, model, why = choose_archive(args, work, images)
    print(f"soak: serving {why} as {model!r}; payloads {images} "
          f"({sum(1 for q in images.rglob('*') if q.is_file())} files); {args.users} users for {args.duration} s",
          flush=True)
    prefix = out / "locust"
    clear_outputs(prefix)  # a reused folder: never an earlier run's figures or verdict beside this run's failure
    for old in (out / name for name in RESULT_FILES):
        old.unlink(missing_ok=True)
    server = TorchServe(model_store=archive.parent, models=f"{model}={archive.name}")
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        server.close()
        print(f"error: TorchServe did not start with {archive}: {e}", file=sys.stderr)
        return 1
    except BaseException:  # a mistake (a busy port: one line from run_cli) or Ctrl-C: its folder goes too
        server.close()
        raise
    try:
        print(f"TorchServe PID {server.pid} at {server.url}", flush=True)
        sampler = RssSampler(server.pid, args.sample_interval)
        sampler.start()
        t0 = time.time()
        try:
            cmd = locust_command(server.url, images=images, model=model, users=args.users, seconds=args.duration,
                                 prefix=prefix, full_history=True, loglevel="WARNING")
            try:
                rc, _ = run_locust(cmd, log=out / "locust.log", timeout=args.duration + 120)
            except subprocess.TimeoutExpired:
                print(f"error: locust did not stop within {args.duration + 120} s of a {args.duration} s run "
                      f"(see {out / 'locust.log'})", file=sys.stderr)
                return 1
        finally:
            sampler.stop()
            for name in ("ts_log.log", "model_log.log"):
                src = server.log_dir / name
                if src.is_file():
                    with open(src, "rb") as f:
                        f.seek(max(0, src.stat().st_size - 200_000))
                        (out / f"server-{name}").write_bytes(f.read())
    finally:
        server.close()
    if not Path(f"{prefix}_stats_history.csv").is_file():
        print(f"locust wrote no stats history (exit status {rc}):\n{(out / 'locust.log').read_text()[-3000:]}")
        return 1
    rows = merge(history(prefix), sampler.samples, t0)
    write_csv(rows, out / "soak.csv")
    with open(out / "rss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "worker_rss_mb", "java_rss_mb", "worker_pids"])
        for s in sampler.samples:
            w.writerow([round(s["time"] - t0, 2), round(s["worker_rss"] / 2**20, 1), round(s["java_rss"] / 2**20, 1),
                        " ".join(map(str, s["pids"]))])
    summary = evaluate(rows, duration=args.duration, users=args.users, p99_ratio=args.p99_ratio,
                       rss_growth=args.rss_growth, samples=sampler.samples, final=locust_summary(prefix) if Path(final_stats_path(prefix)).is_file() else None,
                       locust_exit_code=rc)
    summary.update(model=model, archive=str(archive), model_choice=why, locust_exit_code=rc,
                   machine=f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                   started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(rows, summary, out / "soak.png")
    print(report(summary))
    print(f"files: {out / 'soak.csv'}, {out / 'soak.png'}, {out / 'summary.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":  # a mistake (a wrong path, a bad option): one line, exit status 2
    sys.exit(run_cli(main))
