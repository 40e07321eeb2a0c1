"""The TorchServe way: ``export archive`` keeps the archiver's inputs in the export folder and prints
the raw ``torch-model-archiver`` command, which builds the same archive by hand."""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from export.__main__ import main
from export.archive import ARCHIVE_INPUTS

pytestmark = pytest.mark.slow


def test_the_printed_archiver_command_builds_the_same_archive(export_dir, tmp_path, capsys):
    work = tmp_path / "export"
    shutil.copytree(export_dir, work)
    store = tmp_path / "store"
    assert main(["archive", "--dir", str(work), "--variant", "onnx", "--name", "shapes", "--model-store", str(store),
                 "--topk", "2"]) == 0
    out = capsys.readouterr().out
    command = out.split("the same by hand:\n", 1)[1].strip().splitlines()[0]
    assert command.startswith('TMPDIR="$(mktemp -d)" torch-model-archiver --model-name shapes ')
    inputs = work / ARCHIVE_INPUTS / "shapes"
    cfg = yaml.safe_load((inputs / "model-config.yaml").read_text())
    assert cfg["handler"]["topk"] == 2 and cfg["handler"]["input_size"]
    assert re.search(r"^onnxruntime==[\d.]+$", (inputs / "requirements.txt").read_text(), re.M)  # the CPU package
    assert (inputs / "core" / "inference" / "images.py").is_file()
    ours = zipfile.ZipFile(store / "shapes.mar")
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    assert "stages its files in $TMPDIR/<model name> (/tmp/<model name>) and deletes that folder" in out
    (tmp_path / "tmp").mkdir()  # where the command's own `mktemp -d` makes the archiver's TMPDIR
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp")}
    subprocess.run(command.replace(f"--export-path {store}", f"--export-path {by_hand}"), shell=True, check=True,
                   env=env, capture_output=True)
    theirs = zipfile.ZipFile(by_hand / "shapes.mar")
    names = sorted(n for n in ours.namelist() if not n.startswith("MAR-INF"))
    assert names == sorted(n for n in theirs.namelist() if not n.startswith("MAR-INF"))
    for n in names:
        assert ours.read(n) == theirs.read(n), n
