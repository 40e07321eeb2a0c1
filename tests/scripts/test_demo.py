"""``make demo``'s ending: a step that fails once the archive is built says that the served model
(model_store/fmnist.mar) was left as it was, and leaves it so."""
from __future__ import annotations

import pytest

from scripts import demo
from tools import REPO


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
