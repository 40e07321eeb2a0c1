import io

from training import progress
from training.progress import tqdm


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_gets_plain_lines_without_carriage_returns(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = tqdm(range(50), desc="epoch 1/1", file=out, mininterval=0)
    for _ in bar:
        bar.set_postfix(loss=1.0)
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("epoch 1/1") for line in lines)
    assert "50/50" in lines[-1]


def test_plain_lines_are_rate_limited():
    out = io.StringIO()
    for _ in tqdm(range(1000), desc="decode", file=out):
        pass
    assert len(out.getvalue().splitlines()) <= 3  # start, end: not one line per redraw


def test_a_postfix_set_every_step_does_not_print_a_line_per_step():
    out = io.StringIO()
    bar = tqdm(range(1000), desc="epoch 1/1", file=out)
    for i in bar:
        bar.set_postfix(loss=f"{i:.4f}")
        bar.set_description("epoch 1/1")
    assert len(out.getvalue().splitlines()) <= 3


def test_a_terminal_gets_tqdm_bar():
    out = _Terminal()
    for _ in tqdm(range(10), desc="x", file=out, mininterval=0):
        pass
    assert "\r" in out.getvalue()
