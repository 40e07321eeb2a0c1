"""benchmarks.gates' writer: gate records come from a real `export verify` of a trained model's graphs,
one per reduced-precision variant, passed only where every precision hint it ran with passed."""
from __future__ import annotations

import json

import pytest

from benchmarks.gates import load_gates, main, records_from_verify, verdict, write_records

INT8 = {"runtime": "openvino", "precision": "int8"}
OV = {"runtime": "openvino", "precision": "fp32"}
ONNX = {"runtime": "onnxruntime", "precision": "fp32"}


def row(*, agreement=1.0, change=0.0, problems=()):
    return {"accuracy": 0.9 + change / 100, "accuracy_change_points": change, "top1_agreement": agreement,
            "problems": list(problems), "max_rel_diff": 1e-3}


def test_one_record_per_variant_worst_of_its_hints_and_fp32_left_out():
    rows = {"onnx (cpu)": {**row(), "accuracy_change_points": None},  # fp32: gated by parity, never recorded
            "openvino (f32)": {**row(), "accuracy_change_points": None},
            "openvino (bf16)": row(agreement=0.998, change=-0.1),
            "openvino-int8 (f32)": row(agreement=0.995, change=0.2),
            "openvino-int8 (bf16)": row(agreement=0.985, change=-0.3, problems=["top-1 agreement 98.50% < 99.0%"])}
    recs = {r["variant"]: r for r in records_from_verify(rows, variants={"onnx": ONNX, "openvino": OV,
                                                                         "openvino-int8": INT8},
                                                         arch="resnet50", source="test")}
    assert set(recs) == {"openvino-bf16", "openvino-int8"}
    assert recs["openvino-bf16"]["passed"] and recs["openvino-bf16"]["top1_agreement"] == 0.998
    int8 = recs["openvino-int8"]
    assert not int8["passed"]  # one hint failed: the variant fails
    assert (int8["accuracy_change_points"], int8["top1_agreement"]) == (-0.3, 0.985)
    assert set(int8["runs"]) == {"f32", "bf16"}


def test_rows_not_run_are_skipped_but_stale_graphs_and_unlabelled_data_are_refused():
    ok = {"openvino-int8 (f32)": row(), "openvino (bf16)": {"error": "not run: no bf16 on this CPU"}}
    recs = records_from_verify(ok, variants={"openvino": OV, "openvino-int8": INT8}, arch="a", source="s")
    assert [r["variant"] for r in recs] == ["openvino-int8"]
    stale = {"openvino-int8": {"error": "not run: model_ov_int8.bin changed", "problems": ["changed"]}}
    with pytest.raises(ValueError, match="changed"):
        records_from_verify(stale, variants={"openvino-int8": INT8}, arch="a", source="s")
    with pytest.raises(ValueError, match="labelled"):
        records_from_verify({"openvino-int8 (f32)": {**row(), "accuracy_change_points": None}},
                            variants={"openvino-int8": INT8}, arch="a", source="s")


def test_write_records_merges_by_arch_and_variant(tmp_path):
    path = tmp_path / "gates.json"
    base = {"passed": True, "accuracy_change_points": 0.0, "top1_agreement": 1.0, "source": "s"}
    write_records(path, [{**base, "arch": "resnet50", "variant": "openvino-int8"},
                         {**base, "arch": "cbam_resnet", "variant": "openvino-int8"}])
    write_records(path, [{**base, "arch": "resnet50", "variant": "openvino-int8", "passed": False}])
    gates = load_gates(path)
    assert len(gates) == 2 and gates[("resnet50", "openvino-int8")]["passed"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["gates.json"]  # no temporary left behind


@pytest.mark.slow
def test_records_from_a_real_export_of_a_trained_model_feed_the_bench_verdict(export_dir, export_manifest,
                                                                              image_folder, tmp_path, capsys):
    gates = tmp_path / "gates.json"
    status = main(["--dir", str(export_dir), "--data", str(image_folder / "test"), "--eval-images", "90",
                   "--gates", str(gates)])
    out = capsys.readouterr().out
    records = json.loads(gates.read_text())["gates"]
    by_variant = {r["variant"]: r for r in records}
    # every reduced-precision graph of the export is recorded; no fp32 one
    assert {"openvino-int8", "onnx-int8", "onnx-fp16"} <= set(by_variant)
    assert not {"onnx", "openvino", "torchscript"} & set(by_variant)
    assert status == (0 if all(r["passed"] for r in records) else 1)
    int8 = by_variant["openvino-int8"]
    assert int8["arch"] == export_manifest["arch"] and "f32" in int8["runs"]
    assert (int8["model_kwargs"], int8["input_size"]) == (export_manifest["model_kwargs"], export_manifest["input_size"])
    assert f"{int8['arch']}/openvino-int8: " in out
    # the bench reads the file back and counts a passing record
    v = verdict(arch=int8["arch"], variant_info=export_manifest["variants"]["openvino-int8"], variant="openvino-int8",
                runtime_precision="f32", gates=load_gates(gates), model_kwargs=export_manifest["model_kwargs"])
    assert v["counts"] == int8["passed"] and v["record"]["source"].startswith("python -m benchmarks.gates")


def test_an_int8_record_counts_only_for_a_graph_that_keeps_its_fp32_layers_under_a_hint_it_was_judged_with():
    rec = {"arch": "resnet50", "variant": "openvino-int8", "passed": True, "accuracy_change_points": -0.1,
           "top1_agreement": 0.995, "source": "s", "kept_fp32": ["/model/conv1/Conv/WithoutBiases", "/model/fc/Gemm"],
           "runs": {"f32": {}, "bf16": {}}}

    def judged(info, precision="bf16", record=rec):
        return verdict(arch="resnet50", variant_info=info, variant="openvino-int8", runtime_precision=precision,
                       gates={("resnet50", "openvino-int8"): record})
    assert judged({**INT8, "speed_only_kept_fp32": list(reversed(rec["kept_fp32"]))})["counts"]
    assert judged({**INT8, "speed_only_kept_fp32": [*rec["kept_fp32"], "/model/layer1/Conv"]})["counts"]  # slower
    assert judged({**INT8, "int8": {"kept_fp32": rec["kept_fp32"]}})["counts"]  # the gated export's own graph
    v = judged({**INT8, "speed_only_kept_fp32": ["/model/fc/Gemm"]})  # quantized harder than what passed
    assert not v["counts"] and "INT8 in 1 layers the gated graph kept in fp32, e.g. /model/conv1" in v["label"]
    v = judged(INT8)  # a graph that says nothing of what it kept (the old bench echoed the record back)
    assert not v["counts"] and "no record of the layers this graph kept" in v["label"]
    v = judged({**INT8, "speed_only_kept_fp32": rec["kept_fp32"]}, record={**rec, "runs": {"f32": {}}})
    assert not v["counts"] and "never ran openvino-int8 with the bf16 hint" in v["label"]  # judged on f32 only
    # passed under the budget of an export run with --max-drop 5 --min-agreement 0.9: not the project's gate
    for loose, why in (({"accuracy_change_points": -0.6}, "0.5 points"), ({"top1_agreement": 0.985}, "99.0% agreement")):
        v = judged({**INT8, "speed_only_kept_fp32": rec["kept_fp32"]}, record={**rec, **loose})
        assert not v["counts"] and f"passed under a looser budget than the gate's {why}" in v["label"], v["label"]
    bf16 = {"runtime": "openvino", "precision": "fp32"}
    v = verdict(arch="resnet50", variant_info=bf16, variant="openvino", runtime_precision="bf16",
                gates={("resnet50", "openvino-bf16"): {**rec, "variant": "openvino-bf16", "top1_agreement": 0.993}})
    assert not v["counts"] and "99.5% agreement" in v["label"]  # other precisions: the parity gate's 99.5%
    rows = {"openvino-int8 (f32)": row()}
    [r] = records_from_verify(rows, variants={"openvino-int8": {**INT8, "int8": {"kept_fp32": ["a", "b"]}}},
                              arch="resnet50", source="s")
    assert r["kept_fp32"] == ["a", "b"]


def test_speed_only_int8_leaves_the_named_layers_in_fp32(tmp_path, image_folder):
    from export.int8 import QUANTIZABLE_OV, kept_layers_openvino
    from inference.signal_stack import openvino_core
    from tools.models import export_random_model

    def kept(folder, **kw):
        prep = export_random_model("smoke", tmp_path / folder, calib_data=image_folder / "train",
                                   variants=["onnx", "openvino-int8"], **kw)
        manifest = json.loads((prep.export_dir / "export.json").read_text())
        names, layers = kept_layers_openvino(openvino_core().read_model(str(prep.export_dir / "model_ov_int8.xml")))
        return set(names), layers, manifest["variants"]["openvino-int8"]["speed_only_kept_fp32"]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, layers, recorded = kept("a")
    assert set(recorded) == plain and len(plain) < layers  # read back from the graph, not echoed
    ir = openvino_core().read_model(str(tmp_path / "a" / "export_smoke" / "model_ov_int8.xml"))
    quantized = [op.get_friendly_name() for op in ir.get_ordered_ops() if op.get_type_name() in QUANTIZABLE_OV
                 and op.get_friendly_name() not in plain][:2]
    assert len(quantized) == 2
    now, _, recorded = kept("b", keep_fp32=quantized)
    assert set(quantized) <= now and set(recorded) == now
