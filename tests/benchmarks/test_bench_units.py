"""The like-for-like rules of `make bench` without a server: the grid, the gate file and verdicts, medians and
the ratios computed from them (speed-only variants never in best_gated), and the CLI's one-line errors."""
import json
import math
from collections import Counter

import pytest

from benchmarks import bench
from benchmarks.configs import CONFIGS, Split, parse_grid, search_grid
from benchmarks.gates import GateFileError, load_gates, verdict
from benchmarks.limit import block_batches
from benchmarks.report import RATIO_KEYS, ratios, ratios_line
from benchmarks.sitting import eager_split, medians


def test_search_grid_is_every_split_of_all_or_half_the_cores():
    assert search_grid(2) == [Split(1, 1), Split(1, 2), Split(2, 1)]
    assert [str(s) for s in search_grid(4)] == ["1x2", "2x1", "1x4", "2x2", "4x1"]
    assert search_grid(1) == [Split(1, 1)]
    assert parse_grid("1x1, 2x1,2x1") == [Split(1, 1), Split(2, 1)]
    for bad, said in (("2", "write WORKERSxTHREADS"), ("0x1", "must be >= 1"), ("ax1", "write WORKERSxTHREADS"),
                      ("", "the grid is empty")):
        with pytest.raises(ValueError, match=said):
            parse_grid(bad)


def test_stock_threads_come_from_the_environment_and_tta_takes_fp32s_split():
    assert CONFIGS["stock"].env_for(Split(1, 2)) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert CONFIGS["ours_fp32"].env_for(Split(2, 1)) == {}
    assert CONFIGS["stock"].searched and CONFIGS["ours_fp32"].searched and CONFIGS["ours_ov_int8"].searched
    for name in ("ours_fp32_flip", "ours_fp32_adaptive"):
        assert not CONFIGS[name].searched and CONFIGS[name].split_of == "ours_fp32"
    bf16, flip = CONFIGS["ours_ov_bf16"], CONFIGS["ours_ov_bf16_flip"]
    assert not flip.searched and flip.split_of == "ours_ov_bf16" and flip.tta == "flip"
    assert (flip.variant, flip.handler) == (bf16.variant, bf16.handler)  # the same graph and precision, plus flip


RECORD = {"arch": "resnet50", "variant": "openvino-int8", "passed": True, "accuracy_change_points": -0.3,
          "top1_agreement": 0.992, "source": "test"}


def test_gate_file_formats_and_mistakes(tmp_path):
    assert load_gates(tmp_path / "absent.json") == {}
    with pytest.raises(GateFileError, match="not found"):
        load_gates(tmp_path / "absent.json", required=True)
    p = tmp_path / "gates.json"
    p.write_text(json.dumps([RECORD, {**RECORD, "passed": False}]))  # the later record wins
    assert load_gates(p)[("resnet50", "openvino-int8")]["passed"] is False
    p.write_text(json.dumps({"gates": [RECORD]}))
    assert load_gates(p)[("resnet50", "openvino-int8")] == RECORD
    for bad in ("{", json.dumps({"x": 1}), json.dumps([{**RECORD, "passed": "yes"}]),
                json.dumps([{k: v for k, v in RECORD.items() if k != "source"}])):
        p.write_text(bad)
        with pytest.raises(GateFileError):
            load_gates(p)


def test_verdicts_fp32_by_parity_reduced_precision_only_with_a_passing_record():
    fp32_ov = {"runtime": "openvino", "precision": "fp32", "parity": {"max_rel_diff": 2e-6}}
    int8 = {"runtime": "openvino", "precision": "int8", "speed_only_kept_fp32": ["/model/fc/Gemm"]}
    gates = {("resnet50", "openvino-int8"): {**RECORD, "kept_fp32": ["/model/fc/Gemm"], "runs": {"bf16": {}}}}
    v = verdict(arch="resnet50", variant_info={"runtime": "onnxruntime", "precision": "fp32"}, variant="onnx",
                runtime_precision=None, gates={})
    assert v["status"] == "parity" and v["counts"]
    v = verdict(arch="resnet50", variant_info=fp32_ov, variant="openvino", runtime_precision="f32", gates={})
    assert v["status"] == "parity" and v["counts"]  # the bf16 hint on a CPU without bf16 runs f32
    v = verdict(arch="resnet50", variant_info=fp32_ov, variant="openvino", runtime_precision="bf16", gates=gates)
    assert (v["status"], v["counts"], v["gate_variant"]) == ("speed-only", False, "openvino-bf16")
    assert verdict(arch="resnet50", variant_info=int8, variant="openvino-int8", runtime_precision="bf16",
                   gates=gates)["counts"]
    assert not verdict(arch="cbam_resnet", variant_info=int8, variant="openvino-int8", runtime_precision="bf16",
                       gates=gates)["counts"]  # a record of another architecture does not count
    # make bench passes the served model's kwargs: a record of other widths, or of unknown ones, counts for none
    judged = {("resnet50", "openvino-int8"): {**gates[("resnet50", "openvino-int8")], "model_kwargs": {}}}
    assert verdict(arch="resnet50", variant_info=int8, variant="openvino-int8", runtime_precision="bf16",
                   gates=judged, model_kwargs={})["counts"]
    for kwargs, other in (({"widths": [16, 32, 64, 128]}, "{}"), ({}, "(not recorded)")):
        v = verdict(arch="resnet50", variant_info=int8, variant="openvino-int8", runtime_precision="bf16",
                    gates=judged if other == "{}" else gates, model_kwargs=kwargs)
        assert not v["counts"] and f"the record's resnet50 has model kwargs {other}, this one {kwargs}" in v["label"]
    failed = {("resnet50", "openvino-int8"): {**gates[("resnet50", "openvino-int8")], "passed": False}}
    v = verdict(arch="resnet50", variant_info=int8, variant="openvino-int8", runtime_precision="bf16", gates=failed)
    assert not v["counts"] and "gate failed" in v["label"]


def run(img_s, *, set_name="jpeg500", users=16, p99=100.0):
    return {"set": set_name, "users": users, "img_s": img_s, "p50_ms": 50.0, "p99_ms": p99, "failures": 0}


def result(name, kind, tta, counts, runs, limit=None):
    return {"name": name, "config": {"kind": kind, "tta": tta}, "gate": {"counts": counts}, "limit_img_s": limit,
            "split": {"workers": 2, "threads": 1}, "runs": runs, "medians": medians(runs)}


def test_medians_and_ratios_are_like_for_like():
    m = medians([run(10.0), run(14.0), run(11.0), run(3.0, users=1)])
    assert m["jpeg500@16"] == {"img_s": 11.0, "min": 10.0, "max": 14.0, "n": 3, "p50_ms": 50.0, "p99_ms": 100.0,
                               "failures": 0}
    assert m["jpeg500@1"]["n"] == 1
    sitting = {"eager_limit": {"img_s": 20.0}, "results": [
        result("stock", "stock", "none", False, [run(10.0, p99=900), run(12.0, p99=800), run(11.0, p99=1000)]),
        result("ours_fp32", "ours", "none", True, [run(20.0), run(22.0), run(40.0), run(5.0, set_name="phone12mp"),
                                                   run(15.0, set_name="jpeg500_paired")], limit=25.0),
        result("ours_fp32_flip", "ours", "flip", True, [run(11.0)], limit=12.0),
        result("ours_ov_bf16", "ours", "none", True, [run(30.0)], limit=31.0),
        result("ours_ov_bf16_flip", "ours", "flip", True, [run(20.0)], limit=21.0),
        result("ours_ov_int8", "ours", "none", False, [run(90.0, p99=2000)], limit=100.0),
        result("ours_fails_fast", "ours", "none", True, [{**run(1.0, p99=10.0), "failures": 40}], limit=1.0),
    ]}
    sitting["results"][0]["runs"].append(run(2.0, set_name="phone12mp"))
    sitting["results"][0]["medians"] = medians(sitting["results"][0]["runs"])
    r = ratios(sitting, top=16, small=sitting)
    v = r["values"]
    assert v["ours/stock"] == pytest.approx(22.0 / 11.0)              # medians, not the best run
    assert v["runtime_gap"] == pytest.approx(25.0 / 20.0)
    assert v["best_gated/stock"] == pytest.approx(30.0 / 11.0) and r["best_gated"] == "ours_ov_bf16"
    assert v["best_speed_only/stock"] == pytest.approx(90.0 / 11.0) and r["best_speed_only"] == "ours_ov_int8"
    assert v["served/limit"] == pytest.approx(22.0 / 25.0)           # the worst of the configurations
    assert r["served_over_limit"]["ours_ov_int8"] == pytest.approx(0.9)
    assert v["flip_tta_cost"] == pytest.approx(2.0) and math.isnan(v["adaptive_tta_cost"])
    # from the same rounds: the jpeg500 run measured beside the 12 MP runs, not the main rounds' 22 img/s
    assert v["small/12mp"] == pytest.approx(15.0 / 5.0) and v["ours/stock_12mp"] == pytest.approx(2.5)
    assert math.isnan(ratios(sitting, top=16)["values"]["small/12mp"])  # no decode-bound model run: not another's
    assert v["flip_tta_cost_bf16"] == pytest.approx(1.5)
    assert r["p99_below_stock"] == "4/6"  # the one failing fast has the lowest p99 and does not count
    line = ratios_line("AVX2", r)
    assert line.startswith("ratios: isa=AVX2 ours/stock=2.00 runtime_gap=1.25 best_gated/stock=2.73 served/limit=0.88 "
                           "flip_tta_cost=2.00 adaptive_tta_cost=nan small/12mp=3.00 ours/stock_12mp=2.50 ")
    assert [w.split("=")[0] for w in line.split()[2:2 + len(RATIO_KEYS)]] == list(RATIO_KEYS)
    assert " flip_tta_cost_bf16=1.50" in line
    sitting["results"][3]["limit_img_s"] = None  # its in-process limit failed: the worst is unknown, not 0.88
    assert math.isnan(ratios(sitting, top=16)["values"]["served/limit"])


def test_the_isa_class_needs_its_flags():
    from benchmarks.report import isa_class
    assert isa_class({"avx2", "fma"}) == "AVX2" and isa_class({"avx2", "avx512f"}) == "AVX512"
    assert isa_class({"avx2", "avx512f", "avx512_bf16", "amx_tile"}) == "AMX"
    assert isa_class(set()) == isa_class({"fp", "asimd"}) == isa_class({"sse4_2"}) == "OTHER"  # ARM, old x86


def test_eager_fp32_limit_runs_in_stocks_split_else_in_ours_fp32s():
    two_by_one, one_by_two = {"workers": 2, "threads": 1}, {"workers": 1, "threads": 2}
    assert eager_split({"stock": {"split": two_by_one}, "ours_fp32": {"split": one_by_two}}) == (Split(2, 1), "stock")
    assert eager_split({"ours_fp32": {"split": one_by_two}}) == (Split(1, 2), "ours_fp32")
    assert eager_split({"stock": {"split": None}, "ours_fp32": {"split": one_by_two}}) == (Split(1, 2), "ours_fp32")
    assert eager_split({"stock": {"split": two_by_one}}) is None  # no ONNX Runtime side: no runtime_gap


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    assert bench.main(["--gates", str(tmp_path / "missing.json")]) == 2
    assert bench.main(["--grid", "2by1"]) == 2
    assert bench.main(["--configs", "ours_fp32,nope"]) == 2
    assert bench.main(["--models", "resnet51"]) == 2
    assert bench.main(["--models", "cbam_resnet", "--configs", "stock,ours_fp32"]) == 2  # stock is ResNet-50's
    assert bench.main(["--models", "smoke", "--configs", "ours_ov_int8"]) == 2  # the smoke export has ONNX only
    assert bench.main(["--batch", "0"]) == 2
    assert bench.main(["--max-batch-delay", "-1"]) == 2
    assert bench.main(["--settle", "-5"]) == 2
    assert bench.main(["--duration", "0"]) == 2  # locust's -t 0s has no end: the sitting would hang
    assert bench.main(["--search-duration", "-1"]) == 2
    assert bench.main(["--models", "resnet50,resnet50"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 12 and all(line.startswith("error: ") for line in err)


def test_adaptive_tta_limits_are_timed_over_whole_cycles_of_the_photos():
    assert block_batches(21, 8, adaptive=False) == 1  # a batch costs the same whatever its photos
    for photos, batch in ((21, 8), (16, 8), (3, 8), (7, 1)):
        n = block_batches(photos, batch, adaptive=True)  # which photos trigger TTA sets a batch's cost
        taken = Counter(i % photos for i in range(n * batch))  # the photos taken in turn, as the limit does
        assert set(taken.values()) == {n * batch // photos} and len(taken) == photos  # each equally often
        assert all(len({i % photos for i in range(m * batch)}) < photos or m * batch % photos
                   for m in range(1, n))  # and no shorter block does that
    assert block_batches(21, 8, adaptive=True) == 21


def test_the_stock_archive_batches_as_ours_do(tmp_path):
    """Stock TorchServe's archive (the built-in image_classifier over the eager model) gets the batching,
    workers and timeout of ours at the same split: model-config.yaml written by the same WorkerSettings."""
    import zipfile

    import yaml

    from benchmarks.served import RESPONSE_TIMEOUT, build_archive_for
    from inference.settings import WorkerSettings
    from tools.models import ExportedModel
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "index_to_name.json").write_text('{"0": "a", "1": "b"}')
    (tmp_path / "state.pth").write_bytes(b"weights")  # the archiver packs it as it is
    prep = ExportedModel(spec=None, ckpt=tmp_path / "c.pt", state_dict=tmp_path / "state.pth", export_dir=export_dir)
    name = build_archive_for(CONFIGS["stock"], Split(2, 1), prep, tmp_path / "store", threshold=0.9)
    with zipfile.ZipFile(tmp_path / "store" / f"{name}.mar") as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(mar.read(manifest["model"]["configFile"]))
        assert manifest["model"]["handler"] == "image_classifier" and "index_to_name.json" in mar.namelist()
    assert config == {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 10,
                      "responseTimeout": RESPONSE_TIMEOUT}
    ours = WorkerSettings(batch_size=8, max_batch_delay=10, workers=2, response_timeout=RESPONSE_TIMEOUT)
    assert config == ours.to_config()


def test_each_round_begins_one_configuration_later():
    from benchmarks.sitting import rotated
    assert [rotated(["stock", "ours", "int8"], i) for i in range(4)] == [
        ["stock", "ours", "int8"], ["ours", "int8", "stock"], ["int8", "stock", "ours"], ["stock", "ours", "int8"]]
    assert rotated([], 2) == []
