"""Load from ``locustfile.py`` run headless (closed loop), and the CSVs it writes.

``locust_command`` builds the command line, ``run_locust`` runs it and measures locust's own CPU
time; ``summary`` reads the whole run's ``Aggregated`` figures (throughput, failures, percentiles) from
``PREFIX_final.json`` (``locustfile.py --final-stats``, written as locust quits), or from ``PREFIX_stats.csv``,
whose last row is a snapshot up to a second before the end, ``history`` the ``Aggregated`` rows of ``PREFIX_stats_history.csv`` (one a second, with
``full_history=True``). Locust writes ``N/A`` or an empty cell where it has no value: ``number``
reads those as None.
"""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from tools import REPO

LOCUSTFILE = REPO / "locustfile.py"
PERCENTILES = ("50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "100%")


def locust_command(host: str, *, images: str | Path, model: str, users: int, seconds: int, prefix: str | Path,
                   schema: str | None = None, full_history: bool = False, loglevel: str = "ERROR",
                   stop_timeout: int | None = 10, locustfile: str | Path = LOCUSTFILE,
                   processes: int | None = None, token: str | None = None) -> list[str]:
    """``users`` closed-loop users spawned at once for ``seconds``; CSVs under ``prefix``. ``processes``:
    locust forks that many load processes (its ``--processes``; for servers faster than one core of
    locust, e.g. a GPU's). ``token``: the inference key, sent as ``--token=KEY`` (TorchServe's keys are
    URL-safe base64: one in 64 starts with "-", which ``--token KEY`` would read as an option)."""
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", host, "--images", str(images), "--model-name", model]
    if schema:
        cmd += ["--schema", schema]
    cmd += ["--csv", str(prefix), "--final-stats", final_stats_path(prefix)]
    if full_history:
        cmd.append("--csv-full-history")
    cmd += ["--only-summary", "--loglevel", loglevel]
    if stop_timeout is not None:
        cmd += ["--stop-timeout", str(stop_timeout)]
    if processes and processes > 1:
        cmd += ["--processes", str(processes)]
    if token:
        cmd.append(f"--token={token}")
    return cmd


def run_locust(cmd: list[str], *, log: str | Path | None = None, timeout: float | None = None,
               cwd: str | Path = REPO) -> tuple[int, float]:
    """Run a ``locust_command``; its output goes to ``log`` (or nowhere). Returns (exit status, CPU
    seconds locust used: user + system of the finished child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") if log else open(os.devnull, "w") as out:
        rc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return rc, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def aggregated(prefix: str | Path) -> dict:
    """The raw ``Aggregated`` row of ``PREFIX_stats.csv``."""
    with open(f"{prefix}_stats.csv") as f:
        row = next((r for r in csv.DictReader(f) if r["Name"] == "Aggregated"), None)
    if row is None:  # locust stopped before its first request (a bad setting: its own output says which)
        raise ValueError(f"{prefix}_stats.csv has no Aggregated row: locust sent no request")
    return row


def clear_outputs(prefix: str | Path) -> None:
    """Remove what a run with ``prefix`` writes, so that a reused prefix never shows an earlier run's figures (a
    locust that dies before it quits writes no final figures, and :func:`summary` would read the last run's)."""
    for path in (final_stats_path(prefix), *(f"{prefix}_{kind}.csv" for kind in
                                              ("stats", "stats_history", "failures", "exceptions"))):
        Path(path).unlink(missing_ok=True)


def final_stats_path(prefix: str | Path) -> str:
    """Where ``locustfile.py --final-stats`` writes the whole run's figures for a ``--csv PREFIX`` run."""
    return f"{prefix}_final.json"


def summary(prefix: str | Path) -> dict:
    """``ok_per_s`` (answered without failure per second), ``requests_per_s``, ``requests``,
    ``failures``, ``p50_ms``, ``p99_ms`` and every percentile locust reports (``percentiles``): the whole run's
    (``PREFIX_final.json``, written when locust quits), else the CSV's last snapshot (``source`` says which)."""
    final = Path(final_stats_path(prefix))
    if final.is_file():
        f = json.loads(final.read_text())
        pct = {k: number(v) for k, v in f["percentiles"].items() if number(v) is not None}
        return {"ok_per_s": f["requests_per_s"] - f["failures_per_s"], "requests_per_s": f["requests_per_s"],
                "requests": int(f["requests"]), "failures": int(f["failures"]), "p50_ms": pct.get("50%"),
                "p99_ms": pct.get("99%"), "percentiles": pct, "source": final.name}
    agg = aggregated(prefix)
    pct = {k: number(agg[k]) for k in PERCENTILES if number(agg.get(k)) is not None}
    return {"ok_per_s": float(agg["Requests/s"]) - float(agg["Failures/s"]),
            "requests_per_s": float(agg["Requests/s"]),
            "requests": int(agg["Request Count"]), "failures": int(agg["Failure Count"]),
            "p50_ms": pct.get("50%"), "p99_ms": pct.get("99%"), "percentiles": pct, "source": f"{Path(prefix).name}_stats.csv"}


def history(prefix: str | Path) -> list[dict]:
    """The raw ``Aggregated`` rows of ``PREFIX_stats_history.csv``, in time order."""
    with open(f"{prefix}_stats_history.csv") as f:
        return [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
