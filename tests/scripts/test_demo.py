"""``make demo``'s ending: a step that fails once the archive is built says that the served model
(model_store/fmnist.mar) was left as it was, and leaves it so."""
from __future__ import annotations

import urllib.error

import pytest

from inference.cli import UsageError
from scripts import demo
from tools import REPO
from tools.torchserve import ServerExited


def test_a_failed_step_after_export_says_the_served_archive_was_kept(monkeypatch):
    mar = REPO / "model_store" / f"{demo.MODEL}.mar"
    before = mar.read_bytes() if mar.is_file() else None
    titles = []

    def step(title, *cmd, ok=(0,)):
        titles.append(title)
        if title.startswith("archive"):
            raise SystemExit("demo stopped: the step above failed with exit status 2")
        return 0
    monkeypatch.setattr(demo, "step", step)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit, match=rf"exit status 2; model_store/{demo.MODEL}\.mar was left as it was$"):
        demo.main([])
    assert titles[-1].startswith("archive") and len(titles) == 5
    assert (mar.read_bytes() if mar.is_file() else None) == before


@pytest.mark.parametrize("error", [TimeoutError("TorchServe not ready after 120 s (connection refused): log"),
                                   ServerExited("TorchServe exited with 1: log"),
                                   UsageError("something already listens on 127.0.0.1:8080"),
                                   ConnectionResetError(104, "Connection reset by peer"),
                                   urllib.error.URLError("Connection refused")])
def test_a_server_that_fails_is_one_line_saying_the_served_archive_was_kept(monkeypatch, capsys, error):
    """A TorchServe that never gets ready, exits or cannot start, or a connection refused or reset while the
    demo checks the served answers: exit status 2 and one line, not a traceback, saying
    model_store/fmnist.mar was kept. A bug (any other error) keeps its traceback."""
    from inference.cli import run as run_cli
    mar = REPO / "model_store" / f"{demo.MODEL}.mar"
    before = mar.read_bytes() if mar.is_file() else None
    monkeypatch.setattr(demo, "step", lambda title, *cmd, ok=(0,): 0)

    class Server:
        def __init__(self, **kwargs):
            self.pid = None

        def start(self):
            raise error

        def close(self):
            pass
    monkeypatch.setattr(demo, "TorchServe", Server)
    monkeypatch.chdir(REPO)
    assert run_cli(demo.main, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: demo stopped: ") and \
        err[0].endswith(f"model_store/{demo.MODEL}.mar was left as it was"), err
    assert (mar.read_bytes() if mar.is_file() else None) == before


def test_a_bug_in_the_serve_stage_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(demo, "step", lambda title, *cmd, ok=(0,): 0)

    class Server:
        def __init__(self, **kwargs):
            self.pid = None

        def start(self):
            raise RuntimeError("a bug")

        def close(self):
            pass
    monkeypatch.setattr(demo, "TorchServe", Server)
    monkeypatch.chdir(REPO)
    with pytest.raises(RuntimeError, match="a bug"):
        demo.main([])
