"""Archives are atomic and checked: a failed build keeps the earlier .mar whole; a graph whose bytes changed
after export is not packed; ``verify --archive`` refuses a checkpoint that is not the one the card names."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from export.__main__ import main
from export.archive import build_archive
from export.integrity import IntegrityError, sha256
from inference import atomic
from tests.conftest import REPO


def small_export(checkpoint, out, formats="onnx") -> None:
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--formats", formats,
                 "--eval-images", "16"]) == 0


def test_a_failed_archive_write_keeps_the_earlier_mar_and_leaves_no_temporary(export_dir, tmp_path, monkeypatch):
    store = tmp_path / "store"
    mar = build_archive(export_dir, variant="onnx", name="shapes", model_store=store)
    before = mar.read_bytes()

    def disk_full(*, src, dst):
        dst.write(src.read(4096))  # part of the new archive reaches the temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "copy_stream", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_archive(export_dir, variant="onnx", name="shapes", version="2.0", model_store=store)
    assert mar.read_bytes() == before
    assert sorted(os.listdir(store)) == ["shapes.mar"]


def test_a_killed_archive_builds_temporary_is_removed_by_the_next_build(export_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store / f".shapes.mar.{dead.pid}.abc123.tmp").write_bytes(b"PK\x03\x04 truncated")
    (store / ".shapes.mar.1.abc123.tmp").write_bytes(b"a live build's")  # pid 1 is alive: left alone
    mar = build_archive(export_dir, variant="onnx", name="shapes", model_store=store)
    assert sorted(os.listdir(store)) == [".shapes.mar.1.abc123.tmp", "shapes.mar"]
    with zipfile.ZipFile(mar) as z:
        assert z.testzip() is None


def test_no_archive_folder_is_replaced_whole(export_dir, tmp_path):
    store = tmp_path / "store"
    for version in ("1.0", "2.0"):
        path = build_archive(export_dir, variant="onnx", name="shapes", version=version, model_store=store,
                             archive_format="no-archive")
    assert json.loads((path / "MAR-INF" / "MANIFEST.json").read_text())["model"]["modelVersion"] == "2.0"
    assert sorted(os.listdir(store)) == ["shapes"]


def test_a_graph_changed_after_export_is_not_archived(export_dir, export_manifest, tmp_path):
    copy = tmp_path / "ex"
    copy.mkdir()
    for f in ("export.json", "index_to_name.json", "model.onnx"):
        shutil.copyfile(export_dir / f, copy / f)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")  # e.g. overwritten by hand, or by an export whose commit did not finish
    recorded, actual = export_manifest["variants"]["onnx"]["sha256"]["model.onnx"], sha256(copy / "model.onnx")
    store = tmp_path / "store"
    with pytest.raises(IntegrityError, match=f"model.onnx has sha256 {actual} but .* records {recorded}"):
        build_archive(copy, variant="onnx", name="shapes", model_store=store)
    with pytest.raises(SystemExit) as e:
        main(["archive", "--dir", str(copy), "--name", "shapes", "--model-store", str(store)])
    message = str(e.value.code)
    assert message.startswith("error: model.onnx has sha256") and "\n" not in message
    assert recorded in message and actual in message
    assert not list(store.iterdir())


def test_an_entry_without_recorded_hashes_is_not_archived(export_dir, tmp_path):
    copy = tmp_path / "ex"
    copy.mkdir()
    for f in ("index_to_name.json", "model.onnx"):
        shutil.copyfile(export_dir / f, copy / f)
    manifest = json.loads((export_dir / "export.json").read_text())
    del manifest["variants"]["onnx"]["sha256"]  # written by an export from before graph hashes
    (copy / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="records no sha256 for model.onnx"):
        build_archive(copy, variant="onnx", name="shapes", model_store=tmp_path / "store")


def test_verify_archive_refuses_a_checkpoint_whose_sha256_differs(checkpoint, random_checkpoint, tmp_path):
    ckpt = tmp_path / "best.pt"
    shutil.copyfile(checkpoint, ckpt)
    small_export(ckpt, tmp_path / "ex")
    mar = build_archive(tmp_path / "ex", variant="onnx", name="shapes", model_store=tmp_path / "store")
    assert main(["verify", "--archive", str(mar), "--eval-images", "16"]) == 0
    recorded = sha256(ckpt)
    shutil.copyfile(random_checkpoint, ckpt)  # e.g. training wrote a new best.pt at the recorded path
    for extra in ([], ["--checkpoint", str(random_checkpoint)]):
        with pytest.raises(SystemExit) as e:
            main(["verify", "--archive", str(mar), "--eval-images", "16", *extra])
        message = str(e.value.code)
        path = extra[1] if extra else str(ckpt)
        assert message.startswith(f"error: checkpoint {path} has sha256 {sha256(random_checkpoint)} but the "
                                  f"model card of {mar} records checkpoint_sha256 {recorded}"), message
        assert "\n" not in message


def test_verify_dir_reports_a_changed_graph_without_running_it(checkpoint, tmp_path, capsys):
    out = tmp_path / "ex"
    small_export(checkpoint, out, "onnx,torchscript")
    with open(out / "model.onnx", "ab") as f:
        f.write(b"\0")
    capsys.readouterr()
    assert main(["verify", "--dir", str(out), "--eval-images", "16"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("onnx: model.onnx has sha256") for line in lines)  # reported, not run
    assert not any(line.startswith("onnx (cpu)") for line in lines)
    assert any(line.startswith("torchscript (cpu) ") for line in lines)  # the intact graph was compared
    assert not any(line.startswith("torchscript (cpu):") for line in lines)  # ... and found within tolerance


def test_verify_cli_refusal_is_one_line_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export", "verify", "--archive", str(tmp_path / "none.mar")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user mistake: one line, exit 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: archive not found: {tmp_path / 'none.mar'}"


def test_archiving_leaves_a_folder_named_after_the_model_in_the_temporary_folder_alone(export_dir, tmp_path,
                                                                                         monkeypatch):
    """torch-model-archiver 0.12 stages in $TMPDIR/<model name> and deletes that folder first: `export archive
    --name own` deleted a user's /tmp/own, with the export folder and the photos in it (found 2026-12-07)."""
    from export.archive import build_archive
    tmp = tmp_path / "tmp"
    mine = tmp / "shapes"
    mine.mkdir(parents=True)
    (mine / "photo.jpg").write_bytes(b"a user's file")
    monkeypatch.setenv("TMPDIR", str(tmp))  # what the archiver's process reads as its temporary folder
    mar = build_archive(export_dir, variant="onnx", name="shapes", model_store=tmp_path / "store")
    assert zipfile.ZipFile(mar).getinfo("model.onnx").file_size > 0
    assert (mine / "photo.jpg").read_bytes() == b"a user's file"
    assert sorted(os.listdir(tmp)) == ["shapes"]  # nothing staged there either


def test_a_no_archive_build_never_replaces_a_folder_no_archive_wrote(export_dir, tmp_path):
    """--archive-format no-archive replaced any folder at MODEL_STORE/NAME whole (found by review 2026-12-07)."""
    from export.archive import build_archive
    store = tmp_path / "work"
    (store / "shapes" / "notes").mkdir(parents=True)
    (store / "shapes" / "notes" / "plan.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a folder that no archive wrote"):
        build_archive(export_dir, variant="onnx", name="shapes", model_store=store, archive_format="no-archive")
    assert (store / "shapes" / "notes" / "plan.txt").read_text() == "mine"
    from export.archive import build_archives
    (store / "m_torchscript").mkdir()  # several variants: every target is checked before any is written
    with pytest.raises(ValueError, match="m_torchscript is a folder that no archive wrote"):
        build_archives(export_dir, variants="onnx,torchscript", name="m", model_store=store, archive_format="no-archive")
    assert not (store / "m_onnx").exists()
    built = build_archive(export_dir, variant="onnx", name="other", model_store=store, archive_format="no-archive")
    assert build_archive(export_dir, variant="onnx", name="other", model_store=store, archive_format="no-archive",
                         topk=2) == built  # an earlier no-archive folder is replaced as before
