"""`benchmarks.cpu_window` on real processes: a child that keeps one core busy stands in for the frontend,
the window opens when a stats history file gets its first row (as locust writes it) and closes before the
run's end; no row, no window."""
import os
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.cpu_window import CpuWindow, machine_busy

BUSY = "import time\nend = time.time() + 30\nwhile time.time() < end:\n    pass\n"
HEADER = "Timestamp,User Count,Type,Name,Requests/s\n"


@pytest.fixture
def busy_process():
    p = subprocess.Popen([sys.executable, "-c", BUSY])
    yield p
    p.kill()
    p.wait()


def test_the_window_counts_the_cores_of_the_run_once_it_has_started(tmp_path, busy_process):
    history = tmp_path / "run_stats_history.csv"
    history.write_text(HEADER)  # the header alone: not started yet

    def locust_starts():
        time.sleep(0.5)
        history.write_text(HEADER + "1796417982,16,,Aggregated,0.0\n")

    t = threading.Thread(target=locust_starts)
    t0 = time.perf_counter()
    with CpuWindow(busy_process.pid, history_csv=history, seconds=2.0) as w:
        t.start()
        time.sleep(3.0)
    t.join()
    r = w.result
    assert r is not None and 0.9 <= r["window_s"] <= 1.1  # [0.5 s settle, 2 s - 0.5 s margin] after the first row
    assert r["cores"] >= 1
    assert 0.7 <= r["frontend_cores"] <= 1.05  # the busy child: one core
    assert r["workers_cores"] == 0 and r["locust_cores"] == 0  # it has no TorchServe workers; no locust runs
    assert r["machine_busy_cores"] >= 0.7
    assert time.perf_counter() - t0 < 3.5


def test_no_window_when_the_run_never_starts_or_ends_first(tmp_path, busy_process):
    with CpuWindow(busy_process.pid, history_csv=tmp_path / "absent.csv", seconds=2.0) as w:
        time.sleep(0.3)
    assert w.result is None
    history = tmp_path / "h.csv"
    history.write_text(HEADER + "1796417982,16,,Aggregated,0.0\n")
    with CpuWindow(busy_process.pid, history_csv=history, seconds=12.0) as w:  # the run ends before the window
        time.sleep(0.5)
    assert w.result is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to restrict one run to one of them")
def test_the_machine_is_the_cpus_this_process_may_use(busy_process):
    """In a container restricted to some of the host's CPUs, the other CPUs' load is not this run's: the busy
    child pinned to CPU 1 is busy time of CPU 1's window, and a process restricted to CPU 0 counts CPU 0 only."""
    os.sched_setaffinity(busy_process.pid, {1})
    time.sleep(0.3)
    a = machine_busy({1})
    time.sleep(1.0)
    assert machine_busy({1}) - a >= 0.7  # the child kept CPU 1 busy
    code = ("import os; os.sched_setaffinity(0, {0})\n"
            "from benchmarks.cpu_window import machine_busy\nfrom inference.threads import available_cores\n"
            "x = machine_busy(); y = machine_busy({0}); z = machine_busy()\n"
            "print(available_cores(), x <= y <= z, round(z - x, 3), machine_busy({0, 1}) - z > 1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "1" and out[1] == "True" and float(out[2]) < 0.1 and out[3] == "True"
    import psutil  # CPUs /proc/stat does not list (LXCFS renumbers them): the whole machine, not 0
    t = psutil.cpu_times()
    assert machine_busy({10**6}) >= sum(t) - t.idle - t.iowait - t.guest - t.guest_nice - 1
