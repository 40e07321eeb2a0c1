"""``python -m export`` as users get it wrong: every mistake is one line (no traceback) and writes nothing;
a Ctrl-C in the middle of a commit leaves no half-updated folder; ``verify`` judges a graph by the gate it
was exported under, and counts a graph it could not run as a problem."""
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import replace

import pytest

from export import staging
from export.__main__ import main
from export.archive import build_archive
from export.staging import JOURNAL, Staging
from tests.conftest import CLASSES, REPO, TINY_KWARGS
from training.checkpoint import ModelSpec, save_checkpoint


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and text in last, last


def test_out_or_model_store_that_is_a_file_is_one_line(checkpoint, export_dir, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    one_line_error(run_export("--checkpoint", str(checkpoint), "--out", str(a_file), "--formats", "onnx"),
                   f"{a_file}: file exists")
    one_line_error(run_export("archive", "--dir", str(export_dir), "--name", "shapes", "--model-store", str(a_file)),
                   f"{a_file}: file exists")
    assert a_file.read_text() == "mine"


def test_weights_that_do_not_fit_the_architecture_are_one_line(tmp_path):
    """A checkpoint whose weights are of another width than the kwargs it records (another version of the
    model code, or kwargs edited by hand)."""
    spec = ModelSpec(arch="cbam_resnet", class_names=CLASSES, input_size=24, resize_size=26, mean=(0.5,) * 3,
                     std=(0.25,) * 3, model_kwargs=TINY_KWARGS)
    other = replace(spec, model_kwargs={**TINY_KWARGS, "head_width": 16})
    path = tmp_path / "best.pt"
    save_checkpoint(path, spec, other.build())
    one_line_error(run_export("--checkpoint", str(path), "--out", str(tmp_path / "ex"), "--formats", "onnx"),
                   f"{path}: its weights do not fit its architecture 'cbam_resnet'")
    assert not (tmp_path / "ex").exists()


@pytest.mark.parametrize("option,value,text", [
    ("--min-agreement", "99", "--min-agreement is a share in (0, 1] (0.99 for 99%), got 99.0"),
    ("--max-drop", "-1", "--max-drop is in top-1 points and must be >= 0, got -1.0"),
])
def test_a_gate_out_of_range_is_refused_before_any_work(checkpoint, tmp_path, option, value, text):
    with pytest.raises(SystemExit, match=f"^error: {text.replace('(', '[(]').replace(')', '[)]')}"):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "ex"), "--formats", "onnx", option, value])
    assert not (tmp_path / "ex").exists()


@pytest.mark.parametrize("option", ["--val-data", "--calib-data"])
def test_int8_is_never_tuned_on_the_test_images(checkpoint, image_folder, tmp_path, option):
    test = str(image_folder / "test")
    with pytest.raises(SystemExit, match=f"^error: {option} is --data"):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "ex"), "--formats", "openvino-int8",
              "--data", test, option, test + "/"])  # the same folder, written otherwise


def test_ctrl_c_during_the_commit_finishes_it(tmp_path, monkeypatch):
    out = tmp_path / "ex"
    out.mkdir()
    for name in ("model.onnx", "export.json"):
        (out / name).write_text(f"old {name}")
    real, calls = os.replace, []

    def interrupted(src, dst):  # Ctrl-C arrives after the graph was renamed into OUT, before export.json
        if os.path.dirname(os.fspath(dst)) == str(out):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt
        real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with Staging(out=out) as st:
            for name in ("model.onnx", "export.json"):
                (tmp_path / "x").write_text(f"new {name}")
                real(tmp_path / "x", st.file(name))
            monkeypatch.setattr(staging.os, "replace", interrupted)
            try:
                st.commit(["model.onnx", "export.json"])
            finally:
                monkeypatch.setattr(staging.os, "replace", real)
    # the graph and the export.json that lists it are the new ones together; the staging folder is gone
    assert (out / "model.onnx").read_text() == "new model.onnx"
    assert (out / "export.json").read_text() == "new export.json"
    assert sorted(os.listdir(out)) == ["export.json", "model.onnx"]


def test_a_commit_that_cannot_be_finished_is_left_to_recover(tmp_path, monkeypatch):
    out = tmp_path / "ex"

    def full(**kwargs):  # the renames into OUT fail, at the commit and again when the with block ends
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging, "_move_in", full)
    with pytest.raises(OSError, match="No space left on device"):
        with Staging(out=out) as st:
            (tmp_path / "x").write_text("new")
            os.replace(tmp_path / "x", st.file("model.onnx"))
            st.commit(["model.onnx"])
    monkeypatch.undo()
    (left,) = out.glob(".staging-*")  # the journal and the graph stay for the next export's recover()
    assert (left / JOURNAL).is_file() and (left / "model.onnx").is_file()
    staging.recover(out=out, log=lambda *a: None)
    assert (out / "model.onnx").read_text() == "new" and not list(out.glob(".staging-*"))


def test_verify_judges_by_the_gate_recorded_at_export(export_dir, export_manifest, monkeypatch):
    """export_dir was exported with --min-agreement 0.98; verify used to apply the default 99% to it."""
    from export import audit
    for info in export_manifest["variants"].values():
        assert info["gate"] == {"max_drop": 0.5, "min_agreement": 0.98}
    seen = []
    real = audit.problems
    monkeypatch.setattr(audit, "problems", lambda *a, **kw: seen.append(kw["min_agreement"]) or real(*a, **kw))
    audit.verify(str(export_dir), data=None, eval_images=8, log=lambda *a: None)
    assert seen and set(seen) == {0.98}


def test_verify_counts_a_graph_it_could_not_load(checkpoint, tmp_path, monkeypatch, capsys):
    from export import audit
    out = tmp_path / "ex"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--formats", "onnx", "--eval-images", "8"]) == 0

    def missing_runtime(path, **kwargs):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(audit, "load_backend", missing_runtime)
    capsys.readouterr()
    assert main(["verify", "--dir", str(out), "--eval-images", "8"]) == 1  # was 0: nothing verified, "passed"
    assert "onnx (cpu): could not be loaded: No module named 'onnxruntime'" in capsys.readouterr().out


def test_archive_mistakes_are_one_line_and_keep_the_saved_inputs(export_dir, tmp_path, monkeypatch):
    from export import archive
    store = tmp_path / "store"
    mar = build_archive(export_dir, variant="onnx", name="shapes", model_store=store)
    inputs = export_dir / "archive" / "shapes"
    saved, before = (inputs / "model-config.yaml").read_bytes(), mar.read_bytes()
    with zipfile.ZipFile(mar) as z:
        assert z.read("model-config.yaml") == saved  # the by-hand command rebuilds what is in the store
    for variant in (",", " "):
        with pytest.raises(SystemExit, match="^error: --variant .* names no variant"):
            main(["archive", "--dir", str(export_dir), "--name", "shapes", "--variant", variant,
                  "--model-store", str(store)])

    def archiver_fails(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="some progress\n", stderr="Traceback ...\nOSError: boom\n")

    monkeypatch.setattr(archive.subprocess, "run", archiver_fails)
    with pytest.raises(SystemExit) as e:  # a failed build: one line, and neither archive nor inputs change
        main(["archive", "--dir", str(export_dir), "--name", "shapes", "--batch-size", "2",
              "--model-store", str(store)])
    assert str(e.value.code) == "error: torch-model-archiver failed (exit status 1): OSError: boom"
    assert (inputs / "model-config.yaml").read_bytes() == saved
    assert mar.read_bytes() == before and sorted(os.listdir(store)) == ["shapes.mar"]


def test_an_export_folder_with_a_comma_is_refused_before_anything_is_written(export_dir, tmp_path):
    comma = tmp_path / "a,b"
    comma.symlink_to(export_dir)
    with pytest.raises(ValueError, match="cannot take a path with ','"):
        build_archive(comma, variant="onnx", name="shapes", model_store=tmp_path / "store")
    assert not (tmp_path / "store").exists()
    assert json.loads((export_dir / "export.json").read_text())  # untouched


def test_archive_requirements_pin_the_cpu_runtime_and_a_missing_one_is_one_line(monkeypatch):
    """The archiving machine's onnxruntime-gpu went into requirements.txt (a CPU server installing per-model
    dependencies pulled the CUDA wheel); a runtime not installed here was PackageNotFoundError's traceback."""
    import importlib.metadata

    from export.archive import requirements
    text = requirements("onnxruntime")
    assert text.startswith("onnxruntime==") and "onnxruntime-gpu" not in text
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: (_ for _ in ()).throw(
        importlib.metadata.PackageNotFoundError(d)) if d.startswith("openvino") else real(d))
    with pytest.raises(ValueError, match="the openvino graph needs openvino, which is not installed here"):
        requirements("openvino")


def test_the_raw_command_of_a_renamed_no_archive_folder_moves_the_folder(export_dir):
    from export.archive import archiver_command
    command = archiver_command(export_dir, variant="onnx", name="m", file_name="m_v2", model_store="store",
                               archive_format="no-archive")
    assert command.endswith("&& mv store/m store/m_v2")


def test_archiving_several_variants_checks_them_all_before_writing_any(export_dir, tmp_path):
    """--variant onnx,nope: onnx's archive was published, then the run failed on the missing one."""
    from export.archive import build_archives
    with pytest.raises(ValueError, match="holds no nope graph"):
        build_archives(export_dir, variants="onnx,nope", name="m", model_store=tmp_path / "store")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
