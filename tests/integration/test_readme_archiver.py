"""The raw ``torch-model-archiver`` command printed in the README builds an archive that a real
TorchServe serves: the command is read out of the README (so the two cannot drift), pointed at a test
export instead of ``exports/demo``, run, and the archive is served and asked for a prediction."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from export.__main__ import main as export_main
from tests.conftest import CLASSES, REPO, encode, pattern_image
from tools.client import predict
from tools.torchserve import TorchServe

pytestmark = pytest.mark.slow


def readme_archiver_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r'```bash\nTMPDIR="\$\(mktemp -d\)" (torch-model-archiver --model-name fmnist .*?)```', text, re.S)
    assert block, "the README's raw torch-model-archiver command (with its own TMPDIR) is gone"
    return shlex.split(block.group(1).replace("\\\n", " "))


def test_the_readmes_raw_archiver_command_builds_an_archive_that_serves(export_dir, tmp_path):
    work = tmp_path / "exports" / "demo"
    work.parent.mkdir()
    shutil.copytree(export_dir, work)
    # `export archive` writes the inputs the raw command names (EXPORT/archive/fmnist/...)
    assert export_main(["archive", "--dir", str(work), "--variant", "onnx", "--name", "fmnist",
                        "--model-store", str(tmp_path / "unused_store"), "--topk", "2"]) == 0
    store = tmp_path / "model_store"
    store.mkdir()
    argv = readme_archiver_command()
    assert argv[0] == "torch-model-archiver"
    argv = [a.replace("exports/demo", str(work)) for a in argv]
    argv = [str(REPO / a) if a == "handlers/classifier_handler.py" else a for a in argv]
    argv[argv.index("--export-path") + 1] = str(store)
    (tmp_path / "tmp").mkdir()  # the README's TMPDIR="$(mktemp -d)": the archiver deletes $TMPDIR/fmnist
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp")}
    subprocess.run(argv, check=True, env=env, capture_output=True, cwd=tmp_path)
    assert (store / "fmnist.mar").is_file()
    ts = TorchServe(model_store=store, models="fmnist=fmnist.mar")
    ts.start(timeout=180)
    try:
        status, body = predict(ts.url, "fmnist", encode(pattern_image("vertical", seed=5)))
    finally:
        ts.close()
    assert status == 200, body
    assert body["predictions"][0]["class"] in CLASSES and len(body["predictions"]) == 2
