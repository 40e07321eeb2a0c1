"""tools.log_tail: the lines appended to a log4j2 RollingFile since a point, across its rollovers (log4j2
renames the file, then starts a new one at the same path), as tools.drain reads TorchServe's logs."""
from __future__ import annotations

import gzip
import os

from tools.log_tail import LogTail, inode


def _append(path, *lines):
    with open(path, "a") as f:
        f.write("".join(f"{x}\n" for x in lines))


def _roll(path, name, *, compress=False):
    """What log4j2's rollover does: rename (or compress) the full file; the next line starts a new one."""
    if compress:  # the new file is made before the old one goes, so it cannot take the old one's inode number
        (path.parent / f"{name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        (path.parent / "new.tmp").write_text("")
        os.replace(path.parent / "new.tmp", path)
    else:
        os.rename(path, path.parent / name)


def test_a_rollover_between_reads_loses_no_line(tmp_path):
    log = tmp_path / "access_log.log"
    _append(log, "before the server started")
    tail = LogTail(log, offset=log.stat().st_size, inode=inode(log))
    _append(log, "a1", "a2")
    assert list(tail.lines()) == ["a1", "a2"]
    _append(log, "a3")
    _roll(log, "access_log.2026-12-06.1.log")
    _append(log, "b1")
    assert list(tail.lines()) == ["a3", "b1"] and not tail.lost


def test_several_rollovers_before_the_first_read_are_read_in_order(tmp_path):
    log = tmp_path / "access_log.log"
    _append(log, "old")
    tail = LogTail(log, offset=log.stat().st_size, inode=inode(log))  # a server started; the drain comes days later
    _append(log, "a")
    _roll(log, "access_log.2026-12-06.1.log")
    for day, text in ((7, "b"), (8, "c")):
        _append(log, text)
        os.utime(log, ns=(day * 10**9, day * 10**9))  # rolled later: a later modification time
        _roll(log, f"access_log.2026-12-0{day}.1.log")
    _append(log, "d")
    os.utime(tmp_path / "access_log.2026-12-06.1.log", ns=(6 * 10**9, 6 * 10**9))
    assert list(tail.lines()) == ["a", "b", "c", "d"] and not tail.lost


def test_a_half_written_line_waits_and_a_compressed_roll_is_reported_lost(tmp_path):
    log = tmp_path / "access_log.log"
    log.write_text("")
    tail = LogTail(log, inode=inode(log))
    with open(log, "a") as f:
        f.write("x1\nx2 half")
    assert list(tail.lines()) == ["x1"]
    _append(log, " written")
    assert list(tail.lines()) == ["x2 half written"]
    _append(log, "x3")
    _roll(log, "access_log.06-Dec.log.gz", compress=True)  # TorchServe's own log4j2.xml gzips its rolled files
    _append(log, "y1")
    assert list(tail.lines()) == ["y1"] and tail.lost


def test_without_a_known_inode_a_shorter_file_is_a_rollover_with_lines_lost(tmp_path):
    log = tmp_path / "ts_log.log"
    _append(log, "0123456789" * 3)
    tail = LogTail(log, offset=log.stat().st_size)
    log.write_text("new\n")
    assert list(tail.lines()) == ["new"] and tail.lost
    assert list(LogTail(tmp_path / "missing.log").lines()) == []


def test_torchserves_log_config_rolls_the_two_drained_logs_into_plain_files_and_keeps_twenty(tmp_path):
    import re

    from tools.log_tail import ROLLED_MAX, ROLLED_PATTERN
    from tools.torchserve import log_config
    xml = log_config(tmp_path / "log4j2.xml").read_text()
    for name in ("access_log", "ts_log"):
        block = re.search(rf'name="{name}".*?</RollingFile>', xml, re.S)[0]
        assert f'/{name}.{ROLLED_PATTERN}"' in block and ".gz" not in block, block
        assert f'<DefaultRolloverStrategy max="{ROLLED_MAX}"><Delete basePath="${{env:LOG_LOCATION:-logs}}" ' \
               f'maxDepth="1"><IfFileName glob="{name}.*.log"/><IfLastModified age="14d"/>' in block
    assert xml.count(".log.gz") == 3  # model_log, model_metrics, ts_metrics: TorchServe's own, untouched
    # the worker trace goes to ts_log.log alone, not also through the root logger to STDOUT
    assert '<Logger name="org.pytorch.serve.wlm.Model" level="trace" additivity="false"><AppenderRef ref="ts_log"/>' \
           in xml


def test_rolled_files_of_one_clock_tick_are_read_in_the_order_of_their_index(tmp_path):
    log = tmp_path / "access_log.log"
    _append(log, "a")
    tail = LogTail(log, inode=inode(log))
    for i, text in ((1, "b"), (2, "c")):
        _roll(log, f"access_log.2026-12-06.{i}.log")
        _append(log, text)
    _roll(log, "access_log.2026-12-06.3.log")
    _append(log, "d")
    for i in (3, 2, 1):  # the same modification time for all three
        os.utime(tmp_path / f"access_log.2026-12-06.{i}.log", ns=(10**9, 10**9))
    assert list(tail.lines()) == ["a", "b", "c", "d"]


def test_lines_across_chunk_boundaries_and_rolled_files_read_a_chunk_at_a_time(tmp_path, monkeypatch):
    import tools.log_tail
    monkeypatch.setattr(tools.log_tail, "CHUNK", 7)  # every line crosses a chunk boundary somewhere
    log = tmp_path / "access_log.log"
    _append(log, "old")
    tail = LogTail(log, offset=log.stat().st_size, inode=inode(log))
    first = [f"line {i:03d} of the first file" for i in range(40)]
    _append(log, *first)
    _roll(log, "access_log.2026-12-06.1.log")
    _append(log, "new 1", "new 2")
    with open(log, "a") as f:
        f.write("half")
    assert list(tail.lines()) == first + ["new 1", "new 2"] and not tail.lost
    assert tail.pos == log.stat().st_size
    _append(log, " done")
    assert list(tail.lines()) == ["half done"]
