"""The served side of ``make bench``: one archive per configuration, and locust load against each.

``build_archives`` writes the ``.mar`` of every configuration (the stock one with
``torch-model-archiver`` and TorchServe's built-in ``image_classifier``, ours with
``export.archive.build_archive``); ``run_served`` starts a TorchServe of its own for one
configuration and drives it with ``locustfile.py`` at each user count, recording throughput,
latency percentiles and the CPU seconds of the server and of locust.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.configs import Config
from tools import REPO
from tools.locust import locust_command, run_locust, summary
from tools.models import ExportedModel
from tools.processes import cpu_seconds
from tools.torchserve import TorchServe

STOCK_MODEL_FILE = REPO / "benchmarks" / "stock_resnet50.py"


def build_archives(configs: list[Config], prep: ExportedModel, store: Path, threshold: float) -> None:
    from export.archive import build_archive
    store.mkdir(parents=True, exist_ok=True)
    for c in configs:
        if c.kind == "stock":
            cfg = store / "stock-config.yaml"
            cfg.write_text(f"minWorkers: {c.workers}\nmaxWorkers: {c.workers}\nbatchSize: 8\nmaxBatchDelay: 10\n"
                           "responseTimeout: 120\n")
            cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", c.name, "--version", "1.0",
                   "--model-file", str(STOCK_MODEL_FILE), "--serialized-file", str(prep.state_dict),
                   "--handler", "image_classifier", "--extra-files", str(prep.export_dir / "index_to_name.json"),
                   "--config-file", str(cfg), "--export-path", str(store), "--force"]
            subprocess.run(cmd, check=True, capture_output=True)
        else:
            build_archive(prep.export_dir, variant=c.variant, name=c.name, model_store=store, batch_size=8,
                          max_batch_delay=10, workers=c.workers, threads=c.threads, topk=5, tta=c.tta,
                          adaptive_tta=c.adaptive, adaptive_threshold=threshold, response_timeout=120,
                          **c.handler)


def load_run(url: str, model: str, payload_dir: Path, users: int, seconds: int, schema: str, prefix: Path) -> dict:
    """One locust run: ``img_s`` (answered without failure per second), failures, percentiles."""
    cmd = locust_command(url, images=payload_dir, model=model, users=users, seconds=seconds, prefix=prefix,
                         schema=schema)
    _, locust_cpu_s = run_locust(cmd)
    s = summary(prefix)
    return {"users": users, "img_s": s["ok_per_s"], "requests": s["requests"], "failures": s["failures"],
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "percentiles": s["percentiles"],
            "locust_cpu_s": locust_cpu_s}


def run_served(c: Config, store: Path, payloads: dict[str, Path], users: list[int], duration: int, work: Path,
               model: str, limit: float | None, *, other_sets: bool = True) -> dict:
    """Serve configuration ``c`` alone and load it at each user count with the first payload set of
    ``payloads`` (``{set name: folder}``), then, with ``other_sets``, with each other set at the
    highest user count (``limit``: its in-process limit). Every run records its ``set``."""
    server = TorchServe(model_store=store, models=f"{c.name}={c.name}.mar", env={**os.environ, **c.env},
                        overrides={"async_logging": "true"})
    server.start(timeout=300)
    first, *others = payloads
    plan = [(first, u) for u in users] + ([(s, max(users)) for s in others] if other_sets else [])
    runs = []
    try:
        for set_name, u in plan:
            cpu0 = cpu_seconds(server.pid)
            r = load_run(server.url, c.name, payloads[set_name], u, duration, c.kind, work / f"{c.name}-{set_name}-{u}")
            r["server_cpu_s"] = cpu_seconds(server.pid) - cpu0
            r["set"] = set_name
            runs.append(r)
            print(f"{model:<12.12} {c.name:<20} {set_name:<9} {u:>3} users: {r['img_s']:7.1f} img/s  p50 {r['p50_ms']} "
                  f"ms  p99 {r['p99_ms']} ms  failures {r['failures']}  cpu: server {r['server_cpu_s']:.0f} s, "
                  f"locust {r['locust_cpu_s']:.0f} s", flush=True)
    finally:
        server.stop()
    return {"name": c.name, "config": c.__dict__, "limit_img_s": limit, "runs": runs}
