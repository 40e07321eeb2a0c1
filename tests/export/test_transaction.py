"""Export is a transaction: graphs are written and verified in a staging folder, then moved in; a refused
variant, a failure or a killed run leaves the earlier graphs and export.json as they were; a later run
merges its entries into export.json, each entry carrying the SHA-256 of its files."""
import json
import subprocess
import sys
import textwrap
import zipfile

import pytest

from export.__main__ import main
from export.archive import build_archive
from export.exporter import Exporter
from export.integrity import sha256
from export.staging import recover
from inference.cli import UsageError
from tests.conftest import REPO
from tests.export.test_export import refuse_reduced_precision


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones and staging folders included) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(checkpoint, out, formats, *extra) -> int:
    return main(["--checkpoint", str(checkpoint), "--out", str(out), "--formats", formats, "--eval-images", "30",
                 *extra])


def test_export_json_records_the_sha256_of_every_graph_file(export_dir, export_manifest, checkpoint):
    assert export_manifest["checkpoint_sha256"] == sha256(checkpoint)
    for name, info in export_manifest["variants"].items():
        assert sorted(info["sha256"]) == sorted(info["files"]), name
        for f, digest in info["sha256"].items():
            assert sha256(export_dir / f) == digest, f
        assert info["checkpoint_sha256"] == sha256(checkpoint) and info["created"] and info["verified_on"]
    assert not list(export_dir.glob(".staging-*"))


def test_a_refused_export_leaves_the_earlier_export_byte_identical(checkpoint, image_folder, tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "ex"
    data = ["--data", str(image_folder / "test")]
    assert export(checkpoint, out, "onnx,onnx-fp16", *data) == 0
    before = snapshot(out)
    refuse_reduced_precision(monkeypatch)
    assert export(checkpoint, out, "onnx-fp16", *data) == 3
    assert "refused (not written): onnx-fp16" in capsys.readouterr().err
    assert snapshot(out) == before  # the earlier fp16 graph, its fp32 source and export.json: untouched


def test_a_failure_while_verifying_leaves_the_output_untouched(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "ex"
    assert export(checkpoint, out, "onnx") == 0
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash of the runtime")

    monkeypatch.setattr("export.exporter.run_backend", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        Exporter(str(checkpoint), str(out)).run(["onnx", "torchscript"], log=lambda *a: None)
    assert snapshot(out) == before


def test_a_derived_variant_keeps_the_earlier_onnx_and_merges_export_json(checkpoint, tmp_path):
    out = tmp_path / "ex"
    assert export(checkpoint, out, "onnx") == 0
    onnx_bytes = (out / "model.onnx").read_bytes()
    earlier = json.loads((out / "export.json").read_text())
    assert export(checkpoint, out, "onnx-fp16") == 0  # built from an fp32 ONNX of its own, in staging
    assert (out / "model.onnx").read_bytes() == onnx_bytes
    merged = json.loads((out / "export.json").read_text())
    assert list(merged["variants"]) == ["onnx", "onnx-fp16"]
    assert merged["variants"]["onnx"] == earlier["variants"]["onnx"]  # its date and checkpoint hash stay
    fp16 = merged["variants"]["onnx-fp16"]
    assert fp16["sha256"] == {"model_fp16.onnx": sha256(out / "model_fp16.onnx")}
    assert fp16["created"] >= earlier["variants"]["onnx"]["created"]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "index_to_name.json", "model.onnx",
                                                     "model_fp16.onnx"]
    with zipfile.ZipFile(build_archive(out, variant="onnx", name="shapes", model_store=tmp_path / "store")) as z:
        card = json.loads(z.read("model_card.json"))
    for key in ("created", "checkpoint_sha256", "verified_on"):  # the packed entry's own, not the latest run's
        assert card[key] == earlier["variants"]["onnx"][key], key


def test_graphs_of_another_model_are_not_added_to_a_folder(checkpoint, random_checkpoint, tmp_path):
    out = tmp_path / "ex"
    assert export(checkpoint, out, "onnx") == 0
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"^error: .*export.json describes another model \(mean") as e:
        export(random_checkpoint, out, "onnx")
    assert "\n" not in str(e.value.code)
    assert snapshot(out) == before


def test_files_no_export_wrote_are_never_written_over(checkpoint, tmp_path):
    """`--checkpoint models/model.pt --out models` replaced the checkpoint with the TorchScript graph, and a
    user's own model.onnx in OUT was replaced too (found by review 2026-12-07): both are refused, before any
    work, and the files stay; a folder an export wrote is re-exported into as before."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(checkpoint.read_bytes())
    with pytest.raises(SystemExit, match=r"^error: .*model\.pt is the checkpoint being exported \(there is no "
                                         r"export\.json\) and this export would write over it") as e:
        export(models / "model.pt", models, "torchscript,onnx")
    assert "\n" not in str(e.value.code)
    assert (models / "model.pt").read_bytes() == checkpoint.read_bytes()
    assert sorted(p.name for p in models.iterdir()) == ["model.pt"]
    out = tmp_path / "ex"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the user's own graph")
    with pytest.raises(SystemExit, match=r"model\.onnx is a file no export wrote"):
        export(checkpoint, out, "onnx")
    assert (out / "model.onnx").read_bytes() == b"the user's own graph"
    (out / "model.onnx").unlink()
    (out / "index_to_name.json").write_text('{"0": "mine"}')
    with pytest.raises(SystemExit, match=r"index_to_name\.json is a file no export wrote"):
        export(checkpoint, out, "onnx")
    (out / "index_to_name.json").unlink()
    assert export(checkpoint, out, "onnx") == 0
    assert export(checkpoint, out, "onnx,torchscript") == 0  # its own files: replaced as before
    assert export(checkpoint, models, "onnx") == 0  # a file beside that is not written over: fine
    assert (models / "model.pt").read_bytes() == checkpoint.read_bytes()


def test_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: checkpoint not found: .*nope\.pt$"):
        export(tmp_path / "nope.pt", tmp_path / "ex", "onnx")


KILLED_MID_COMMIT = textwrap.dedent('''
    import os, sys
    ckpt, out = sys.argv[1:3]
    real = os.replace
    def replace(src, dst):  # the process is killed right after the commit's first rename into OUT
        real(src, dst)
        if os.path.dirname(os.path.abspath(dst)) == os.path.abspath(out):
            os._exit(9)
    os.replace = replace
    from export.exporter import Exporter
    Exporter(ckpt, out).run(["onnx-fp16"], eval_images=16, log=lambda *a: None)
''')


def test_a_run_killed_mid_commit_is_finished_by_the_next_one(checkpoint, tmp_path):
    out = tmp_path / "ex"
    assert export(checkpoint, out, "onnx") == 0
    earlier = (out / "export.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_COMMIT, str(checkpoint), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    (stale,) = out.glob(".staging-*")  # killed: no clean-up ran
    assert (out / "model_fp16.onnx").is_file() and (out / "export.json").read_bytes() == earlier
    lines = []
    recover(out=out, log=lines.append)  # what every export does first
    assert not stale.exists() and "finished the interrupted commit" in lines[0]
    manifest = json.loads((out / "export.json").read_text())
    assert list(manifest["variants"]) == ["onnx", "onnx-fp16"]
    assert manifest["variants"]["onnx-fp16"]["sha256"]["model_fp16.onnx"] == sha256(out / "model_fp16.onnx")


def test_a_stale_staging_folder_without_a_journal_is_removed(checkpoint, tmp_path):
    out = tmp_path / "ex"
    assert export(checkpoint, out, "onnx") == 0
    before = snapshot(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".staging-{dead.pid}-x1y2_3w4"  # tempfile.mkdtemp's 8 characters
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half a graph")
    live = out / ".staging-1-a1b2c3d4"  # pid 1 is alive: another export's folder is left alone
    live.mkdir()
    mine = out / f".staging-{dead.pid}-notes"  # a user's folder that merely looks like one (review 2026-12-07)
    (mine / "keep").mkdir(parents=True)
    assert export(checkpoint, out, "torchscript") == 0
    assert not stale.exists() and live.is_dir() and (mine / "keep").is_dir()
    after = snapshot(out)
    assert after["model.onnx"] == before["model.onnx"] and "model.pt" in after


def test_a_second_export_into_a_folder_being_exported_into_is_one_line(checkpoint, tmp_path):
    out = tmp_path / "ex"
    assert export(checkpoint, out, "onnx") == 0
    before = snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from export.staging import one_export
        with one_export({str(out)!r}):
            print("exporting", flush=True)
            time.sleep(60)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "exporting"
        with pytest.raises(UsageError, match=rf"^{out}: another export is writing into it \(PID {holder.pid}\)"):
            export(checkpoint, out, "torchscript")
        assert snapshot(out) == {**before, ".export.lock": f"{holder.pid}\n".encode()}
    finally:
        holder.kill()  # as kill -9 would: the kernel drops the lock
        holder.wait()
    assert export(checkpoint, out, "torchscript") == 0 and (out / "model.pt").is_file()
    assert not (out / ".export.lock").exists()  # an export leaves no lock file behind
