"""Every command line on a user's mistake (a missing file, a wrong order, a bad option): exit status 2 and
one line on stderr that says what to do, no traceback (``inference.cli``). Each case runs the command as
a user does, in a fresh interpreter."""
import re
import subprocess
import sys

import pytest

from inference.cli import UsageError, one_line, run
from tests.conftest import REPO

# torch logs this at import on machines with a CUDA_HOME but no CUDA runtime (glog format): not ours
TORCH_IMPORT_NOISE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ .*\] ")


def cases(tmp):
    nope, empty, noexport = tmp / "nope", tmp / "empty", tmp / "noexport"
    return {
        "training prepare-fashion-mnist": (["-m", "training", "prepare-fashion-mnist", "--out", tmp / "fm",
                                            "--source", nope], "dataset-fashion-mnist"),
        "training stats": (["-m", "training", "stats", "--data", nope], f"data folder not found: {nope}"),
        "training train": (["-m", "training", "train", "--data", nope, "--out", tmp / "run"],
                           "data folder not found"),
        "training evaluate": (["-m", "training", "evaluate", "--checkpoint", tmp / "best.pt", "--data", empty],
                              f"checkpoint not found: {tmp / 'best.pt'}"),
        "training predict": (["-m", "training", "predict", "--checkpoint", tmp / "best.pt", "--images", empty,
                              "--out", tmp / "p.csv"], "no images"),
        "training predict out is the checkpoint": (["-m", "training", "predict", "--checkpoint", tmp / "junk.pt",
                                                    "--images", empty, "--out", tmp / "junk.pt"],
                                                   f"--out {tmp / 'junk.pt'} is the --checkpoint path: it would be"),
        "training explain out is the image": (["-m", "training", "explain", "--checkpoint", tmp / "junk.pt",
                                               "--image", tmp / "junk.pt", "--out", tmp / "junk.pt"],
                                              "is the --checkpoint path: it would be written over"),
        "training evaluate not a checkpoint": (["-m", "training", "evaluate", "--checkpoint", tmp / "junk.pt",
                                               "--data", empty], "junk.pt is not a checkpoint written by"),
        "training evaluate no such device": (["-m", "training", "evaluate", "--checkpoint", tmp / "junk.pt", "--data",
                                             empty, "--device", "gpu"], "--device 'gpu' is not a device"),
        "training train into another run": (["-m", "training", "train", "--data", nope, "--out", tmp / "oldrun"],
                                            "already holds a run (last.pt, log.csv): resume it with --resume"),
        "training train model kwargs typo": (["-m", "training", "train", "--data", nope, "--out", tmp / "run",
                                              "--model-kwargs", '{"width": 3}'],  # before the data is read
                                             "--model-kwargs {'width': 3}: CBAMResNet.__init__() got an unexpected "
                                             "keyword argument 'width'"),
        "training train out of range": (["-m", "training", "train", "--data", nope, "--out", tmp / "run",
                                          "--label-smoothing", "2"], "--label-smoothing must be at least 0 and below 1"),
        "training train resize below input": (["-m", "training", "train", "--data", nope, "--out", tmp / "run",
                                               "--input-size", "64", "--resize-size", "32"],
                                              "--resize-size 32 is smaller than --input-size 64"),
        "training train model cannot run": (["-m", "training", "train", "--data", nope, "--out", tmp / "run",
                                             "--model-kwargs", '{"widths": [0, 0, 0, 0]}'],  # shapes, before the data
                                            "cannot run on a 32x32 input"),
        "training train yaml type": (["-m", "training", "train", "--config", tmp / "recipe.yaml"],
                                     "lr: expected a number, got 'fast'"),
        "training train resume not a checkpoint": (["-m", "training", "train", "--resume", tmp / "junk.pt"],
                                                   "--resume " + str(tmp / "junk.pt") + " is not a checkpoint"),
        "export": (["-m", "export", "--checkpoint", tmp / "best.pt", "--out", tmp / "ex"], "checkpoint not found"),
        "export archive bad name": (["-m", "export", "archive", "--dir", noexport, "--name", "my model",
                                     "--model-store", tmp / "store"], "--name 'my model': use letters, digits"),
        "export verify no images": (["-m", "export", "verify", "--dir", noexport, "--eval-images", "0"],
                                    "--eval-images must be at least 1"),
        "export archive before export": (["-m", "export", "archive", "--dir", noexport, "--name", "m",
                                          "--model-store", tmp / "store"],
                                         f"{noexport / 'export.json'} not found: run `python -m export"),
        "export verify": (["-m", "export", "verify", "--archive", tmp / "m.mar"], "archive not found"),
        "benchmarks.bench": (["-m", "benchmarks.bench", "--gates", tmp / "g.json"], "gate file"),
        "benchmarks.bench users": (["-m", "benchmarks.bench", "--users", "0,16"], "--users must be user counts >= 1"),
        "benchmarks.gpu_handler": (["-m", "benchmarks.gpu_handler", "--batches", "0"],  # checked before CUDA is
                                   "--batches must be comma-separated integers >= 1"),    # looked for
        "benchmarks.gpu_export": (["-m", "benchmarks.gpu_export", "--dir", noexport],
                                  f"{noexport / 'export.json'} not found"),
        "scripts.ts_server no archives": (["-m", "scripts.ts_server", "serve", "--model-store", empty,
                                           "--state-file", tmp / "s.json"], "no .mar archives in"),
        "scripts.ts_server no config": (["-m", "scripts.ts_server", "serve", "--config", tmp / "c.properties"],
                                        "--config"),
        "scripts.soak": (["-m", "scripts.soak", "--archive", tmp / "m.mar", "--out", tmp / "soak"],
                         "--archive"),
        "scripts.soak options": (["-m", "scripts.soak", "--duration", "0", "--out", tmp / "soak"], "--duration"),
        "scripts/audit.py": (["scripts/audit.py", "-r", tmp / "req.txt"], f"{tmp / 'req.txt'} not found"),
    }


@pytest.mark.parametrize("name", list(cases(REPO)))
def test_a_mistake_is_one_line_and_exit_status_2(name, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noexport").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"a YAML file, an ONNX graph: anything but a checkpoint")
    (tmp_path / "oldrun").mkdir()
    (tmp_path / "oldrun" / "log.csv").write_text("epoch\n1\n")
    (tmp_path / "oldrun" / "last.pt").write_bytes(b"its checkpoint")
    (tmp_path / "recipe.yaml").write_text(f"data: {tmp_path / 'nope'}\nout: {tmp_path / 'run'}\nlr: fast\n")
    argv, expected = cases(tmp_path)[name]
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not TORCH_IMPORT_NOISE.match(ln)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(("error: ", "audit: ")) and expected in lines[0], lines[0]
    assert not (tmp_path / "ex").exists() and not (tmp_path / "store").exists()  # nothing half-written


def test_bad_options_are_argparse_exit_status_2():
    proc = subprocess.run([sys.executable, "-m", "scripts.demo", "--epochs", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --epochs 1" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # the demo did not start


def test_run_turns_mistakes_into_one_line_and_keeps_bugs(capsys, monkeypatch):
    def raises(error):
        def main():
            raise error
        return main

    assert run(raises(UsageError("--x: bad,\n  try --y"))) == 2
    assert capsys.readouterr().err == "error: --x: bad, try --y\n"
    assert run(raises(FileNotFoundError(2, "No such file or directory", "/a/b"))) == 2
    assert capsys.readouterr().err == "error: /a/b: no such file or directory\n"
    assert run(raises(SystemExit("error: already one line"))) == 2
    assert capsys.readouterr().err == "error: already one line\n"
    assert run(raises(SystemExit(3))) == 3 and run(lambda: None) == 0 and run(lambda: 1) == 1
    assert run(raises(ValueError("no images")), expected=(ValueError,)) == 2
    with pytest.raises(RuntimeError):  # not a mistake: a bug keeps its traceback
        run(raises(RuntimeError("boom")))
    with pytest.raises(ValueError):
        run(raises(ValueError("unexpected")))
    # the machine's problems, not the code's: a full disk (export, archive, train), a read-only mount
    capsys.readouterr()
    assert run(raises(OSError(28, "No space left on device", "/store/x.mar"))) == 2
    assert capsys.readouterr().err == "error: /store/x.mar: no space left on device\n"
    assert run(raises(OSError(30, "Read-only file system"))) == 2
    assert capsys.readouterr().err == "error: [Errno 30] Read-only file system\n"
    with pytest.raises(OSError):  # any other OSError is a bug
        run(raises(OSError(5, "Input/output error")))
    monkeypatch.setenv("CLI_TRACEBACK", "1")
    with pytest.raises(UsageError):
        run(raises(UsageError("shown with its traceback")))
    assert one_line(PermissionError(13, "Permission denied", "/x")) == "error: /x: permission denied"


def test_an_error_raised_in_a_dataloader_worker_is_its_own_last_line():
    """torch re-raises a worker's exception with the worker's whole traceback in the message."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Broken(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise ValueError("/data/cat/IMG_1.jpg: cannot read the image: truncated")

    with pytest.raises(ValueError) as e:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(e.value) and torch.utils.data.get_worker_info() is None
    assert one_line(e.value) == "error: /data/cat/IMG_1.jpg: cannot read the image: truncated"


def test_every_training_subcommand_runs_something_and_every_runner_has_its_options():
    import argparse

    from training.__main__ import COMMANDS, _parser
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)
