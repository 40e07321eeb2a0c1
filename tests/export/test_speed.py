"""export.speed: INT8 against its fp32 graph, timed in turns on one thread and on all, recorded and printed."""
import torch

from export.speed import describe, int8_speedup


def test_int8_speedup_times_both_graphs_per_core_and_in_one_process(export_dir):
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # restored: every later test of the session would run on 2 threads
        images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
        speed = int8_speedup(str(export_dir / "model_ov.xml"), str(export_dir / "model_ov_int8.xml"), images,
                             rounds=2, min_run_time=0.05)
    finally:
        torch.set_num_threads(old)
    assert set(speed) == {"per_core", "one_process"}
    assert speed["per_core"]["threads"] == 1 and speed["one_process"]["threads"] == 2
    for s in speed.values():
        assert s["fp32_ms"] > 0 and s["int8_ms"] > 0 and s["rounds"] == 2
        assert abs(s["speedup"] - s["fp32_ms"] / s["int8_ms"]) < 1e-9
        assert 0 < s["fp32_best_ms"] <= s["fp32_ms"] and 0 < s["int8_best_ms"] <= s["int8_ms"]  # the fastest round
        assert abs(s["best_speedup"] - s["fp32_best_ms"] / s["int8_best_ms"]) < 1e-9


def test_one_core_has_one_setting(export_dir):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        speed = int8_speedup(str(export_dir / "model.onnx"), str(export_dir / "model_int8.onnx"),
                             torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8), rounds=1, min_run_time=0.02)
    finally:
        torch.set_num_threads(old)
    assert list(speed) == ["per_core"]


def test_describe_names_threads_and_both_timings():
    line = describe({"per_core": {"threads": 1, "fp32_ms": 0.658, "int8_ms": 0.369, "speedup": 0.658 / 0.369,
                                  "best_speedup": 1.814},
                     "one_process": {"threads": 2, "fp32_ms": 0.497, "int8_ms": 0.365, "speedup": 0.497 / 0.365,
                                     "best_speedup": 1.4}})
    assert line == ("speed against its fp32 graph 1.78x on 1 thread (per core: 0.658 -> 0.369 ms/img, fastest rounds "
                    "1.81x), 1.36x on 2 threads (one process: 0.497 -> 0.365 ms/img, fastest rounds 1.40x)")


def test_describe_reads_a_record_made_before_the_fastest_rounds_were_kept():
    line = describe({"per_core": {"threads": 1, "fp32_ms": 0.658, "int8_ms": 0.369, "speedup": 0.658 / 0.369}})
    assert line == "speed against its fp32 graph 1.78x on 1 thread (per core: 0.658 -> 0.369 ms/img)"


def test_every_int8_entry_records_its_speed_against_fp32(export_manifest):
    for name in ("openvino-int8", "onnx-int8"):
        speed = export_manifest["variants"][name]["parity"]["speed_vs_fp32"]
        assert speed["per_core"]["threads"] == 1 and speed["per_core"]["speedup"] > 0
