"""A ~30-second smoke of `make bench` (one configuration, one user) so the benchmark keeps working."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_smoke_runs_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("ratios: isa=") and " ours/stock=" in lines[-1] and " small/12mp=" in lines[-1]
    assert float(lines[-1].split("small/12mp=")[1].split()[0]) > 0  # the 12 MP set was served
    report = next(line for line in lines if line.startswith("full results: ")).split()[2].rstrip(";")
    data = json.loads(open(report).read())
    small, phone = data["results"][0]["runs"]
    assert (small["set"], phone["set"]) == ("jpeg500", "phone12mp")
    for run in small, phone:
        assert run["users"] == 1 and run["failures"] == 0 and run["img_s"] > 0 and run["requests"] > 0
    assert data["results"][0]["limit_img_s"] > 0
