"""A ~2-minute smoke of `make bench` (tiny model, ours_fp32 and its flip TTA, the whole grid, 2-second runs):
the like-for-like structure (split search, same-split in-process limit, interleaved repeats, medians, gates)
is in the JSON and the last line is the ratios line of the issue."""
import json
import re
import statistics
import subprocess
import sys

import pytest

from benchmarks.configs import BATCH, MAX_BATCH_DELAY, search_grid
from benchmarks.report import RATIO_KEYS
from tests.conftest import REPO

pytestmark = pytest.mark.slow

RATIOS = re.compile(r"^ratios: isa=(AVX2|AVX512|AVX512_BF16|AMX|OTHER) " + " ".join(
    re.escape(k) + r"=(nan|\d+\.\d\d)" for k in RATIO_KEYS) + r"( \S+=\S+)*$")


def test_bench_smoke_runs_end_to_end():
    import tempfile
    from pathlib import Path
    folders = lambda: set(Path(tempfile.gettempdir()).glob("torchserve-*"))  # noqa: E731
    before = folders()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert folders() <= before  # every server of the sitting removed its temporary folder
    lines = proc.stdout.strip().splitlines()
    match = RATIOS.match(lines[-1])
    assert match, lines[-1]
    printed = dict(zip(RATIO_KEYS, match.groups()[1:]))
    for k in ("runtime_gap", "served/limit", "flip_tta_cost", "small/12mp"):  # what the smoke measures
        assert float(printed[k]) > 0, (k, lines[-1])
    assert printed["ours/stock"] == "nan"  # no stock in the smoke: never a made-up number
    report = next(line for line in lines if line.startswith("full results: ")).split()[2].rstrip(";")
    data = json.loads(open(report).read())

    grid = [str(s) for s in search_grid()]
    assert data["grid"] == grid and data["plan"]["repeats"] == 3
    assert (data["plan"]["batch"], data["plan"]["max_batch_delay"]) == (BATCH, MAX_BATCH_DELAY)  # --batch, --max-batch-delay
    fp32, flip = data["results"]
    # the split search: every grid point measured and recorded, the best one chosen
    assert [e["split"] for e in fp32["search"]] == grid
    assert all(e["img_s"] > 0 and e["failures"] == 0 for e in fp32["search"])
    best = max(fp32["search"], key=lambda e: e["img_s"])
    split = f"{fp32['split']['workers']}x{fp32['split']['threads']}"
    assert split == best["split"] and fp32["split_source"] == "search"
    assert flip["split"] == fp32["split"] and flip["split_source"] == "ours_fp32" and flip["search"] == []
    # the in-process limit in the same split: W processes x T threads (decode pool T), img/s summed, once per
    # round of the repeats (right after that round's served runs), the median recorded
    rounds = [min(x["started"] for x in fp32["runs"] + flip["runs"] if x["set"] == "jpeg500" and x["users"] == 16
                  and x["repeat"] == i) for i in range(3)] + [float("inf")]
    for r in (fp32, flip):
        assert len(r["limits"]) == 3 and r["limit"] == r["limits"][-1]
        for i, lim in enumerate(r["limits"]):
            assert (lim["processes"], lim["threads"], lim["decode_pool"]) == (
                r["split"]["workers"], r["split"]["threads"], r["split"]["threads"])
            assert len(lim["per_process"]) == lim["processes"] and lim["img_s"] == pytest.approx(sum(lim["per_process"]))
            assert lim["batch"] == data["plan"]["batch"] == BATCH  # the served batch size (--batch)
            assert rounds[i] < lim["started"] < rounds[i + 1]
            # the CPU its processes used (all their threads: T intra-op + a decode pool of T)
            assert 0 < lim["cores"] <= lim["processes"] * 2 * lim["threads"] + 0.1
        assert r["limit_img_s"] > 0
        assert r["limit_img_s"] == pytest.approx(statistics.median(x["img_s"] for x in r["limits"]))
        assert r["gate"]["status"] == "parity" and r["gate"]["counts"]
    eager = data["models"]["smoke"]["eager_limit"]
    assert eager["runtime"] == "eager fp32" and eager["processes"] == fp32["split"]["workers"] and eager["img_s"] > 0
    assert eager["split_of"] == "ours_fp32" and eager["split"] == split  # no stock in the smoke
    assert len(eager["runs"]) == 3 and eager["img_s"] == pytest.approx(statistics.median(eager["runs"]))
    # interleaved repeats at 16 users, each round begun one configuration later: fp32 #1, flip #1, flip #2, fp32 #2,
    # fp32 #3, flip #3; medians and min-max of them
    top = sorted(((r["name"], x) for r in (fp32, flip) for x in r["runs"] if x["set"] == "jpeg500"
                  and x["users"] == 16), key=lambda nx: nx[1]["started"])
    assert [(x["repeat"], x["split"]) for _, x in top] == [(i, split) for i in range(3) for _ in range(2)]
    assert [name for name, _ in top] == ["ours_fp32", "ours_fp32_flip", "ours_fp32_flip", "ours_fp32", "ours_fp32",
                                         "ours_fp32_flip"]
    for r in (fp32, flip):
        runs = [x for x in r["runs"] if x["set"] == "jpeg500" and x["users"] == 16]
        m = r["medians"]["jpeg500@16"]
        assert m["n"] == 3 and m["img_s"] == statistics.median(x["img_s"] for x in runs)
        assert m["min"] <= m["img_s"] <= m["max"] and m["failures"] == 0
        assert r["medians"]["jpeg500@1"]["n"] == 1
    # where served/limit goes: each measured run's cores, party by party, and the split of the ratio
    for r in (fp32, flip):
        for x in (x for x in r["runs"] if x["set"] == "jpeg500" and x["users"] == 16):
            assert x["cpu"]["workers_cores"] > 0 and x["cpu"]["frontend_cores"] > 0 and x["cpu"]["locust_cores"] > 0
            assert x["cpu"]["machine_busy_cores"] <= x["cpu"]["cores"] + 0.1
        a = data["summary"]["accounting"][r["name"]]
        assert a["share"] * a["efficiency"] == pytest.approx(a["served/limit"])
        assert a["served/limit"] == pytest.approx(data["summary"]["served_over_limit"][r["name"]])
        assert a["ceiling_server_only"] > a["ceiling"] > 0
    assert "where served/limit goes" in proc.stdout
    phone = [x for x in fp32["runs"] if x["set"] == "phone12mp"]
    assert len(phone) == 3 and all(x["users"] == 16 and x["failures"] == 0 and x["img_s"] > 0 for x in phone)
    # every printed ratio is the one computed from those medians
    values = data["summary"]["values"]
    assert float(printed["flip_tta_cost"]) == pytest.approx(
        fp32["medians"]["jpeg500@16"]["img_s"] / flip["medians"]["jpeg500@16"]["img_s"], abs=0.006)
    assert float(printed["served/limit"]) == pytest.approx(values["served/limit"], abs=0.006)
    assert values["ours/stock"] is None and set(RATIO_KEYS) <= set(values)
    b = data["models"]["smoke"]["tta_breakdown"]
    assert b["threads"] == flip["split"]["threads"] and b["ms"]["forward_2n"] > 0 and b["forward_2n_over_n"] > 1
