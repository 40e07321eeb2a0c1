"""scripts.soak and scripts.soak_verdict without a load: the shortest run that has two windows to compare, and a
run that cannot start leaves no earlier verdict behind and says why in one line (the 60 s soak itself is
tests/integration/test_soak.py)."""
from __future__ import annotations

import os
import subprocess
import sys

from scripts.soak_verdict import p99_windows, shortest_duration, windows
from tools import REPO


def test_the_shortest_soak_compares_two_windows_that_do_not_overlap():
    assert shortest_duration() == 40 and p99_windows(40) == ((20.0, 30.0), (30.0, 40.0))
    assert p99_windows(60) == ((20.0, 30.0), (50.0, 60.0))  # the docstring's 60 s run
    assert p99_windows(600) == ((70.0, 130.0), (540.0, 600.0)) and windows(600) == (60.0, 60.0)
    for d in range(shortest_duration(), 2000, 7):
        (lo, hi), (last_lo, last_hi) = p99_windows(d)
        assert windows(d)[0] < lo < hi <= last_lo < last_hi == d


def test_a_run_too_short_to_judge_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.soak", "--duration", "30", "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --duration must be at least 40 s: the verdict compares a window after the warm-up with the last "
        "one (10 s each below 100 s), and shorter runs have no two"], proc.stderr


def test_a_server_that_does_not_start_leaves_no_earlier_verdict_and_no_traceback(tmp_path):
    out, images = tmp_path / "out", tmp_path / "images"
    out.mkdir()
    images.mkdir()
    for name in ("summary.json", "soak.csv", "soak.png", "rss.csv"):
        (out / name).write_text('{"passed": true}')  # an earlier run's
    (tmp_path / "m.mar").write_bytes(b"not read before the server starts")
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    proc = subprocess.run([sys.executable, "-m", "scripts.soak", "--duration", "40", "--out", str(out), "--archive",
                           str(tmp_path / "m.mar"), "--model-name", "m", "--images", str(images)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAVA_HOME": str(tmp_path / "no-java")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: TorchServe did not start with "), proc.stderr[-2000:]
    assert not any((out / name).exists() for name in ("summary.json", "soak.csv", "soak.png", "rss.csv"))
    left = {n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before if n.startswith("torchserve-")}
    assert not left, left  # the server's temporary folder went with it
