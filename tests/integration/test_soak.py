"""A 60 s soak (``python -m scripts.soak``) against a real TorchServe at saturation, judged from its
output files: no failed request, p99 in the last window within 1.5x the first window's (after
warm-up), worker RSS growth within 10%, no worker replaced. The 10-minute soak is ``make soak``."""
import csv
import json
import statistics
import subprocess
import sys

import pytest

from export.archive import build_archive
from tools import REPO

DURATION, USERS = 60, 8
WARMUP = WINDOW = 10  # scripts.soak_verdict.windows(60): duration / 10, at least 10 s


@pytest.mark.slow
def test_soak_60s_no_failures_no_latency_creep_no_memory_growth(export_dir, tmp_path):
    archive = build_archive(export_dir, variant="onnx", name="soak", model_store=tmp_path / "store", batch_size=8,
                            max_batch_delay=10, workers=1, topk=2, tta="none")
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, "-m", "scripts.soak", "--duration", str(DURATION), "--users", str(USERS),
                           "--out", str(out), "--archive", str(archive)], cwd=REPO, capture_output=True, text=True,
                          timeout=DURATION + 240)
    print(proc.stdout[-2500:], proc.stderr[-2500:])
    with open(out / "soak.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The criteria again, straight from soak.csv.
    t = [float(r["t_s"]) for r in rows]
    assert t and t[-1] >= DURATION - 3, "the load did not last the whole run"
    requests, failures = int(rows[-1]["total_requests"]), int(rows[-1]["total_failures"])
    full = [r for r in rows if int(r["users"]) == USERS]

    def in_window(lo, hi, key, source=rows):
        return [float(r[key]) for r in source if lo <= float(r["t_s"]) <= hi and r[key]]
    p99_first = statistics.median(in_window(WARMUP + 10, WARMUP + 10 + WINDOW, "p99_ms", full))
    p99_last = statistics.median(in_window(DURATION - WINDOW, DURATION, "p99_ms", full))
    rss_first = statistics.fmean(in_window(WARMUP, WARMUP + WINDOW, "worker_rss_mb"))
    rss_last = statistics.fmean(in_window(DURATION - WINDOW, DURATION, "worker_rss_mb"))
    worker_pid_sets = {r["worker_pids"] for r in rows if r["worker_pids"]}
    print(f"SOAK {DURATION} s, {USERS} users: {requests} requests ({requests / DURATION:.1f}/s), {failures} failures; "
          f"p99 {p99_first:.0f} -> {p99_last:.0f} ms (x{p99_last / p99_first:.2f}); worker RSS {rss_first:.1f} -> "
          f"{rss_last:.1f} MB ({100 * (rss_last / rss_first - 1):+.1f}%); workers {worker_pid_sets}")
    assert requests > 0 and failures == 0
    assert p99_last <= 1.5 * p99_first
    assert rss_last <= 1.10 * rss_first
    assert len(worker_pid_sets) == 1

    # ... and the script judged the same files the same way.
    # (its counts are the whole run's, locust's figures as it quit: the CSV's last row is up to a second before)
    final = json.loads(next(out.rglob("*_final.json")).read_text())
    assert summary["requests"] == final["requests"] >= requests and summary["failures"] == failures == final["failures"]
    assert summary["p99_ratio"] == pytest.approx(p99_last / p99_first, abs=1e-3)
    assert summary["worker_rss_growth"] == pytest.approx(rss_last / rss_first - 1, abs=1e-3)
    assert summary["passed"] and proc.returncode == 0, summary["problems"]


def _rows(p99_last=200.0, rss_last=500.0, failures=0, pids="101"):
    rows = []
    for t in range(DURATION + 1):
        late = t >= DURATION - WINDOW
        rows.append({"t_s": t, "users": USERS, "rps": 50.0, "failures_per_s": 0.0, "p50_ms": 100.0,
                     "p99_ms": p99_last if late else 200.0, "total_requests": 50 * t,
                     "total_failures": failures if late else 0, "worker_rss_mb": rss_last if late else 500.0,
                     "java_rss_mb": 230.0, "workers": 1, "worker_pids": pids if late else "101"})
    return rows


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"failures": 3}, "3 failed requests"),
    ({"p99_last": 320.0}, "p99 grew 1.60x"),
    ({"p99_last": 290.0}, None),
    ({"rss_last": 560.0}, "worker RSS grew 12.0%"),
    ({"rss_last": 540.0}, None),
    ({"pids": "202"}, "worker processes were replaced"),
])
def test_the_verdict_catches_each_problem(change, problem):
    from scripts.soak_verdict import evaluate
    result = evaluate(_rows(**change), duration=DURATION, users=USERS)
    if problem is None:
        assert result["passed"] and not result["problems"], result["problems"]
    else:
        assert not result["passed"] and any(problem in p for p in result["problems"]), result["problems"]


@pytest.mark.parametrize("final, rc, problem", [
    ({"requests": 3100, "failures": 2}, 1, "2 failed requests"),  # answered during the stop: not in the rows
    (None, 1, "locust exited with status 1"),
    ({"requests": 3100, "failures": 0}, 0, None),
])
def test_the_verdict_counts_the_whole_run_and_locusts_exit_status(final, rc, problem):
    """The per-second rows end up to a second before locust stops: failures answered in that second or during the
    stop timeout passed the soak while locust itself exited 1."""
    from scripts.soak_verdict import evaluate
    result = evaluate(_rows(), duration=DURATION, users=USERS, final=final, locust_exit_code=rc)
    if final:
        assert result["requests"] == 3100 and result["failures"] == final["failures"]
    if problem is None:
        assert result["passed"], result["problems"]
    else:
        assert not result["passed"] and any(problem in p for p in result["problems"]), result["problems"]
