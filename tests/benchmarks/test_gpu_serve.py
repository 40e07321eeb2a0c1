"""benchmarks.gpu_serve: its one-line errors, its ratios, and one real short run on the CPU (a real
TorchServe, locust, ``--model smoke``), which is the same code a GPU machine runs."""
import json

import pytest

from benchmarks import gpu_serve
from inference.cli import run as run_cli


@pytest.mark.parametrize("args, message", [
    (["--configs", "ours_fp32,bogus"], "unknown or no configurations/sets ['bogus']"),
    (["--sets", "tiny"], "unknown or no configurations/sets ['tiny']"),
    (["--configs", "stock", "--model", "smoke"], "stock serves torchvision's ResNet-50 only"),
    (["--split", "4y4"], "--split: bad grid point"),
    (["--users", "0"], "--users must be >= 1"),
])
def test_mistakes_print_one_line(capsys, args, message):
    assert run_cli(gpu_serve.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_ours_admits_a_full_batch_of_phone_photos_with_the_default_budget():
    from inference.admission import batch_pixel_budget
    from tools.photos import PHONE_SIZE
    (stock, ours) = gpu_serve.configs(["stock", "ours_fp16_flip"])
    assert stock.kind == "stock" and not stock.handler
    assert ours.variant == "torchscript-fp16" and ours.tta == "flip" and "max_batch_pixels" not in ours.handler
    batch = gpu_serve.DEFAULTS["batch"]
    assert batch_pixel_budget(None, batch_size=batch, full_size=True) >= batch * PHONE_SIZE[0] * PHONE_SIZE[1]


def test_ratios_are_ours_over_stock_per_set_and_small_over_12mp_per_config():
    rows = [{"config": c, "set": s, "img_s": v} for c, s, v in [
        ("stock", "jpeg500", 100.0), ("stock", "phone12mp", 10.0), ("ours_fp16", "jpeg500", 400.0),
        ("ours_fp16", "phone12mp", 80.0), ("ours_fp32", "jpeg500", 300.0)]]
    assert gpu_serve.ratios(rows) == {
        "stock_small/12mp": 10.0, "ours_fp16/stock_jpeg500": 4.0, "ours_fp16_small/12mp": 5.0,
        "ours_fp16/stock_phone12mp": 8.0, "ours_fp32/stock_jpeg500": 3.0}


@pytest.mark.slow
def test_a_short_run_serves_both_sets_through_torchserve(tmp_path, capsys):
    out = tmp_path / "gpu_serve.json"
    assert gpu_serve.main(["--model", "smoke", "--configs", "ours_onnx", "--sets", "jpeg500,phone12mp",
                           "--split", "1x1", "--batch", "2", "--users", "2", "--seconds", "2",
                           "--locust-processes", "1", "--photos", "1", "--work", str(tmp_path / "work"),
                           "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ours_onnx: TorchServe ready" in printed and "ratios: ours_onnx_small/12mp=" in printed
    report = json.loads(out.read_text())
    assert [(r["config"], r["set"]) for r in report["results"]] == [("ours_onnx", "jpeg500"),
                                                                     ("ours_onnx", "phone12mp")]
    for r in report["results"]:
        assert r["img_s"] > 0 and r["requests"] > 0 and r["failures"] == 0 and r["p99_ms"] > 0
