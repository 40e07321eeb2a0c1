"""The served side of ``make bench``: one archive per configuration and split, its TorchServe, locust runs.

``build_archive_for`` writes the ``.mar`` of a configuration at one workers x threads split (the stock
one with ``torch-model-archiver`` and TorchServe's built-in ``image_classifier``, ours with
``export.archive.build_archive``); ``Served`` is that archive in a TorchServe of its own (its own
ports and temporary folder, stopped by PID), kept running between runs so that runs of different
configurations can be interleaved; ``Served.run`` drives it with ``locustfile.py`` (headless, closed
loop) and records throughput, latency percentiles, the CPU seconds of the server and of locust, and the
cores each party used in the run's steady part (``benchmarks.cpu_window``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.configs import BATCH, MAX_BATCH_DELAY, Config, Split
from benchmarks.cpu_window import CpuWindow
from tools import REPO
from tools.locust import clear_outputs, locust_command, run_locust, summary
from tools.models import ExportedModel
from tools.processes import cpu_seconds
from tools.torchserve import TorchServe

STOCK_MODEL_FILE = REPO / "benchmarks" / "stock_resnet50.py"
RESPONSE_TIMEOUT = 120


def archive_name(c: Config, split: Split) -> str:
    return f"{c.name}_{split}"


def build_archive_for(c: Config, split: Split, prep: ExportedModel, store: Path, threshold: float, *,
                      batch: int = BATCH, max_batch_delay: int = MAX_BATCH_DELAY) -> str:
    """Write ``store/NAME.mar`` for ``c`` served as ``split`` (TorchServe ``batchSize`` ``batch``, ``maxBatchDelay``
    ``max_batch_delay`` ms); returns NAME (the model's name in URLs)."""
    from export.archive import build_archive, run_archiver
    store.mkdir(parents=True, exist_ok=True)
    name = archive_name(c, split)
    if c.kind == "stock":
        import yaml

        from inference.settings import WorkerSettings
        cfg = store / f"{name}-config.yaml"  # TorchServe's keys as ours are written: the same batching for both
        cfg.write_text(yaml.safe_dump(WorkerSettings(batch_size=batch, max_batch_delay=max_batch_delay,
                                                     workers=split.workers,
                                                     response_timeout=RESPONSE_TIMEOUT).to_config(), sort_keys=False))
        run_archiver(["--model-name", name, "--version", "1.0", "--model-file", str(STOCK_MODEL_FILE),
                      "--serialized-file", str(prep.state_dict), "--handler", "image_classifier",
                      "--extra-files", str(prep.export_dir / "index_to_name.json"), "--config-file", str(cfg),
                      "--export-path", str(store), "--force"]).check_returncode()
    else:
        build_archive(prep.export_dir, variant=c.variant, name=name, model_store=store, batch_size=batch,
                      max_batch_delay=max_batch_delay, workers=split.workers, threads=split.threads, topk=5,
                      tta=c.tta, adaptive_tta=c.adaptive, adaptive_threshold=threshold,
                      response_timeout=RESPONSE_TIMEOUT, **c.handler)
    return name


def load_run(url: str, model: str, payload_dir: Path, users: int, seconds: int, schema: str, prefix: Path, *,
             processes: int | None = None) -> dict:
    """One locust run: ``img_s`` (answered without failure per second), failures, percentiles."""
    cmd = locust_command(url, images=payload_dir, model=model, users=users, seconds=seconds, prefix=prefix,
                         schema=schema, processes=processes)
    log = Path(f"{prefix}.locust.log")
    clear_outputs(prefix)  # a reused folder: never an earlier run's figures
    rc, locust_cpu_s = run_locust(cmd, log=log)
    if not Path(f"{prefix}_stats.csv").is_file():  # locust stopped before any request: say why
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
        raise RuntimeError(f"locust wrote no statistics (exit status {rc}): {' / '.join(tail) or 'no output'}")
    s = summary(prefix)
    return {"users": users, "img_s": s["ok_per_s"], "requests": s["requests"], "failures": s["failures"],
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "percentiles": s["percentiles"],
            "locust_cpu_s": locust_cpu_s}


def _cores(cpu: dict | None) -> str:
    if not cpu:
        return ""
    idle = cpu["cores"] - cpu["machine_busy_cores"]
    return (f"; cores: workers {cpu['workers_cores']:.2f}, frontend {cpu['frontend_cores']:.2f}, "
            f"locust {cpu['locust_cores']:.2f}, idle {idle:.2f} of {cpu['cores']}")


class Served:
    """Configuration ``c`` at ``split`` in its own TorchServe: ``start()``, ``run(...)``, ``stop()``."""

    def __init__(self, c: Config, split: Split, *, store: Path, name: str, work: Path, label: str,
                 locust_processes: int | None = None):
        self.c, self.split, self.name, self.work, self.label = c, split, name, work, label
        self.locust_processes = locust_processes
        self.server = TorchServe(model_store=store, models=f"{name}={name}.mar", env={**os.environ, **c.env_for(split)},
                                 overrides={"async_logging": "true"})

    def start(self) -> "Served":
        try:
            self.server.start(timeout=300)
        except BaseException:  # recorded by the sitting, which goes on: not with this server's folder left behind
            self.server.close()
            raise
        return self

    def stop(self) -> None:
        self.server.close()  # a sitting starts about 20 servers: none leaves its temporary folder behind

    def run(self, payload_dir: Path, users: int, seconds: int, *, tag: str, quiet: bool = False, **fields) -> dict:
        """One locust run at ``users`` on the photos of ``payload_dir``; ``fields`` are recorded with it."""
        prefix = self.work / tag
        Path(f"{prefix}_stats_history.csv").unlink(missing_ok=True)
        cpu0, t0 = cpu_seconds(self.server.pid), time.time()
        with CpuWindow(self.server.pid, history_csv=f"{prefix}_stats_history.csv", seconds=seconds) as window:
            r = load_run(self.server.url, self.name, payload_dir, users, seconds, self.c.kind, prefix,
                         processes=self.locust_processes)
        r["server_cpu_s"] = cpu_seconds(self.server.pid) - cpu0
        r["cpu"] = window.result
        r.update(fields, split=str(self.split), duration_s=seconds, started=round(t0, 3))
        if not quiet:
            print(f"{self.label:<12.12} {self.c.name:<19} {str(self.split):<4} {fields.get('set', ''):<9} {users:>3} "
                  f"users{'' if 'repeat' not in fields else ' #' + str(fields['repeat'] + 1)}: {r['img_s']:7.1f} img/s"
                  f"  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  failures {r['failures']}  cpu: server "
                  f"{r['server_cpu_s']:.0f} s, locust {r['locust_cpu_s']:.0f} s" + _cores(r["cpu"]), flush=True)
        return r
