"""Where served/limit goes (`benchmarks.accounting`): the split into the workers' share of the limit's cores
and their efficiency per image, the other parties' cores, and the ceiling with no idle core."""
import pytest

from benchmarks.accounting import accounting, accounting_table


def cpu(workers, frontend, locust, busy, cores=2):
    return {"window_s": 9.0, "cores": cores, "workers_cores": workers, "frontend_cores": frontend,
            "locust_cores": locust, "machine_busy_cores": busy}


def run(img_s, window, *, set_name="jpeg500", users=16, phase="measure"):
    return {"set": set_name, "users": users, "phase": phase, "img_s": img_s, "cpu": window}


def result(runs, *, limit=250.0, limit_cores=(2.0, 1.98, 1.96)):
    return {"name": "ours_ov_int8", "runs": runs, "limit_img_s": limit,
            "limits": [{"img_s": limit, "cores": c} for c in limit_cores]}


def test_served_over_limit_is_the_workers_share_times_their_efficiency():
    runs = [run(200.0, cpu(1.70, 0.10, 0.08, 1.90)), run(210.0, cpu(1.68, 0.11, 0.09, 1.92)),
            run(190.0, cpu(1.72, 0.12, 0.10, 1.95)),
            run(50.0, cpu(1.9, 0.05, 0.02, 1.99), set_name="phone12mp"),   # other set, users, phase: not counted
            run(20.0, cpu(0.3, 0.01, 0.01, 0.4), users=1), run(1.0, cpu(1.0, 0, 0, 1.0), phase="search")]
    a = accounting(result(runs), top=16, set_name="jpeg500")
    assert a["served_img_s"] == 200.0 and a["limit_cores"] == 1.98
    assert (a["workers_cores"], a["frontend_cores"], a["locust_cores"]) == (1.70, 0.11, 0.09)
    assert a["served/limit"] == pytest.approx(200.0 / 250.0)
    assert a["share"] * a["efficiency"] == pytest.approx(a["served/limit"])   # the cores cancel
    ms = a["ms_per_image"]
    assert ms["limit"] == pytest.approx(1000 * 1.98 / 250) and ms["workers"] == pytest.approx(1000 * 1.70 / 200)
    assert a["idle_cores"] == pytest.approx(2 - 1.92) and a["other_cores"] == pytest.approx(1.92 - 1.70 - 0.11 - 0.09)
    # all 2 cores busy at the measured CPU per image of workers + frontend + locust, over the limit
    assert a["ceiling"] == pytest.approx(2 / ((1.70 + 0.11 + 0.09) / 200) / 250)
    assert a["ceiling_server_only"] == pytest.approx(2 / ((1.70 + 0.11) / 200) / 250)
    assert a["ceiling_server_only"] > a["ceiling"]
    table, rows = accounting_table([result(runs), {"name": "stock", "runs": runs}], top=16, set_name="jpeg500")
    assert list(rows) == ["ours_ov_int8"]   # stock has no limit: no row
    assert table.splitlines()[2].startswith("| ours_ov_int8 | 0.80 | 0.86 (1.70 of 1.98) | 0.93 (7.92 ÷ 8.50) |")


def test_no_accounting_without_cpu_windows_or_limit_cores():
    runs = [run(200.0, cpu(1.7, 0.1, 0.1, 1.9))]
    assert accounting(result([run(200.0, None)]), top=16, set_name="jpeg500") is None   # window too short / not started
    assert accounting(result(runs, limit_cores=()), top=16, set_name="jpeg500") is None  # limits of an older sitting
    assert accounting({**result(runs), "limit_img_s": None}, top=16, set_name="jpeg500") is None
    assert accounting(result([run(0.0, cpu(0.1, 0.1, 0.1, 0.3))]), top=16, set_name="jpeg500") is None
