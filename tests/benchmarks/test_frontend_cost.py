"""benchmarks.frontend_cost: the do-nothing handler, the Java thread accounting, and one real short run."""
import re

import pytest

from benchmarks import frontend_cost
from benchmarks.echo_handler import handle


def test_echo_handler_answers_each_body_with_its_length():
    assert handle(None, None) is None
    assert handle([{"body": b"abc"}, {"data": bytearray(b"12345")}, {"body": b""}], None) == [3, 5, 0]


def test_thread_groups_add_up_to_the_process_cpu():
    """A child whose threads all stay alive (a process's total also counts threads that have ended, which
    /proc/PID/task no longer lists): its groups add up to its CPU time."""
    import subprocess
    import sys
    import time

    import psutil
    burn = ("import threading, time\n"
            "def spin(then=0):\n    t = time.thread_time()\n    while time.thread_time() - t < 0.2: pass\n"
            "    time.sleep(then)\n"
            "other = threading.Thread(target=spin, args=(60,), daemon=True); other.start(); spin()\n"
            "while time.process_time() < 0.4: time.sleep(0.01)\n"
            "print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.1)
        groups = frontend_cost.thread_cpu(child.pid)
        t = psutil.Process(child.pid).cpu_times()
    finally:
        child.kill()
        child.wait()
    assert set(groups) == {"other"}  # no Java thread names in a Python process
    assert sum(groups.values()) == pytest.approx(t.user + t.system, abs=0.05)
    # both spinning threads are counted (one alone is 0.2 s); /proc counts clock ticks, not the exact
    # CPU time the child waited for, so a 0.4 s process can read 0.39
    assert sum(groups.values()) >= 0.35


@pytest.mark.parametrize("argv", [["--requests", "0"], ["--clients", "0"], ["--warmup", "-1"]])
def test_bad_counts_are_one_clear_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        frontend_cost.parse_args(argv)
    assert e.value.code == 2
    assert "must be" in capsys.readouterr().err


@pytest.mark.slow
def test_a_short_run_prints_the_cost_of_both_payload_sets(capsys):
    assert frontend_cost.main(["--photos", "1", "--requests", "5", "--warmup", "2", "--clients", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("isa=")
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == set(frontend_cost.SETS)
    for set_name, line in rows.items():
        mb = float(re.search(r"([\d.]+) MB", line)[1])
        java = float(re.search(r"java\s+([\d.]+)", line)[1])
        assert float(re.search(r"([\d.]+) req/s", line)[1]) > 0 and java > 0
        assert (mb > 1.0) == (set_name == "phone12mp")  # 12 MP photos are MBs; 500x375 ones are not
