"""benchmarks.pinning: its one-line errors, and one real short comparison on an exported OpenVINO graph."""
import json

import pytest

from benchmarks import pinning
from tests.conftest import encode, pattern_image


@pytest.mark.parametrize("args, message", [
    (["--graph", "nowhere.xml"], "not an OpenVINO .xml graph"),
    (["--grid", "2y1"], "bad grid point"),
    (["--precision", "fp8"], "--precision must be one of"),
])
def test_mistakes_print_one_line(export_dir, capsys, args, message):
    argv = ["--graph", str(export_dir / "model_ov.xml"), *args] if args[0] != "--graph" else args
    assert pinning.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_an_onnx_graph_is_refused(export_dir, capsys):
    assert pinning.main(["--graph", str(export_dir / "model.onnx")]) == 2
    assert "not an OpenVINO .xml graph" in capsys.readouterr().err


def test_a_short_comparison_prints_both_sides_per_split(export_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for k, kind in enumerate(("circle", "vertical", "horizontal")):
        (images / f"{kind}.jpg").write_bytes(encode(pattern_image(kind, size=40, seed=k), "JPEG", quality=90))
    out = tmp_path / "pinning.json"
    assert pinning.main(["--graph", str(export_dir / "model_ov.xml"), "--images", str(images), "--grid", "1x1",
                         "--precision", "f32", "--seconds", "0.3", "--rounds", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "precision f32" in printed and "unpinned/pinned" in printed
    (row,) = json.loads(out.read_text())["rows"]
    assert row["split"] == "1x1" and len(row["pinned"]) == len(row["unpinned"]) == 1
    assert row["pinned_median"] > 0 and row["unpinned_median"] > 0
    assert row["ratio"] == pytest.approx(row["unpinned_median"] / row["pinned_median"])
    assert any(line.startswith("1x1 ") for line in printed.splitlines())
