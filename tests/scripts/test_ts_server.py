"""scripts.ts_server's mistakes that need no TorchServe: one line, exit status 2 (the server itself:
tests/integration/test_prod_config.py)."""
from __future__ import annotations

import pytest

from inference.cli import run as run_cli
from scripts import ts_server


@pytest.mark.parametrize("line, said", [
    ("grpc_inference_port=seven\n", "grpc_inference_port='seven' must be a port number (1-65535)"),
    ("grpc_management_port=70000\n", "grpc_management_port='70000' must be a port number (1-65535)"),
])
def test_a_config_with_a_bad_grpc_port_is_one_line(tmp_path, capsys, line, said):
    store = tmp_path / "store"
    store.mkdir()
    (store / "m.mar").write_bytes(b"only its name is looked at first")
    config = tmp_path / "c.properties"
    config.write_text("inference_address=http://127.0.0.1:18080\nmanagement_address=http://127.0.0.1:18081\n"
                      "metrics_address=http://127.0.0.1:18082\n" + line)
    assert run_cli(ts_server.main, ["serve", "--config", str(config), "--model-store", str(store), "--state-file",
                                    str(tmp_path / "s.json"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: {said}"


def test_stop_names_a_server_of_another_user_instead_of_a_traceback(tmp_path, capsys, monkeypatch):
    state = tmp_path / "s.json"
    state.write_text('{"pid": 1}')  # init: alive, and not ours to signal unless the tests run as root
    monkeypatch.setattr(ts_server, "_ours_to_signal", lambda pid: False)
    monkeypatch.setattr(ts_server, "_may_be_torchserve", lambda pid: True)  # a TorchServe started with sudo
    assert run_cli(ts_server.main, ["stop", "--state-file", str(state)]) == 2
    assert "belongs to another user" in capsys.readouterr().err and state.is_file()  # left for that user's stop
    monkeypatch.setattr(ts_server, "_may_be_torchserve", lambda pid: False)  # after a reboot: a root daemon's PID
    assert run_cli(ts_server.main, ["stop", "--state-file", str(state)]) == 0
    assert "nothing to stop" in capsys.readouterr().out and not state.is_file()  # stale: removed, not "sudo"


def test_stop_does_not_call_a_server_stale_because_its_command_line_is_hidden(tmp_path, capsys, monkeypatch):
    """/proc mounted hidepid: another user's live TorchServe has an unreadable command line; removing its state
    file as stale left a later `sudo make stop` nothing to stop."""
    import psutil

    class Hidden:
        def __init__(self, pid):
            pass

        def cmdline(self):
            raise psutil.AccessDenied(1)
    state = tmp_path / "s.json"
    state.write_text('{"pid": 1}')
    monkeypatch.setattr(ts_server, "_ours_to_signal", lambda pid: False)
    monkeypatch.setattr(ts_server.psutil, "Process", Hidden)
    assert run_cli(ts_server.main, ["stop", "--state-file", str(state)]) == 2
    assert "belongs to another user" in capsys.readouterr().err and state.is_file()


def test_wait_returns_once_the_state_file_names_a_live_torchserve(tmp_path, capsys, monkeypatch):
    """README's `make serve &` then `make wait`: the state file may appear while it waits; one left by a killed
    server (its PID dead or another program's) is not "ready"."""
    import json
    import threading
    state = tmp_path / "s.json"
    live = {4242}
    monkeypatch.setattr(ts_server, "is_torchserve", lambda pid: pid in live)
    monkeypatch.setattr(ts_server, "_is_serve", lambda pid: pid == 77)  # a `serve` starting TorchServe
    (tmp_path / "s.starting.json").write_text('{"serve_pid": 77}')
    state.write_text('{"pid": 999, "url": "http://127.0.0.1:1"}')  # stale: PID 999 is no TorchServe
    timer = threading.Timer(0.6, lambda: state.write_text(json.dumps({"pid": 4242, "url": "http://127.0.0.1:8080"})))
    timer.start()
    try:
        assert run_cli(ts_server.main, ["wait", "--state-file", str(state), "--timeout", "20"]) == 0
    finally:
        timer.cancel()
    assert capsys.readouterr().out.strip() == "ready: http://127.0.0.1:8080 (PID 4242)"
    state.write_text('{"pid": 4242, "stopping": true}')  # `make stop` is draining it: not ready
    assert run_cli(ts_server.main, ["wait", "--state-file", str(state), "--timeout", "0.3"]) == 1
    assert "not ready after 0.3 s" in capsys.readouterr().err


def test_wait_fails_in_one_line_when_no_serve_is_starting_a_server(tmp_path, capsys, monkeypatch):
    state = tmp_path / "s.json"
    state.write_text('{"pid": 999}')  # left by a server killed with -9, and no `serve` runs
    monkeypatch.setattr(ts_server, "is_torchserve", lambda pid: False)
    monkeypatch.setattr(ts_server, "WAIT_GRACE", 0.2)
    assert run_cli(ts_server.main, ["wait", "--state-file", str(state), "--timeout", "30"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("no `make serve` is starting TorchServe (waited ") and f"s; {state} is stale)" in err
    assert "\n" not in err
    assert run_cli(ts_server.main, ["wait", "--state-file", str(state), "--timeout", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --timeout must be positive, got 0"


class _FakeServer:
    """TorchServe as `serve` drives it, started at once; records stop()."""
    stopped = []

    def __init__(self, **kwargs):
        self.props, self.token_auth, self.pid, self.launcher = {}, False, 4242, None

    def start(self, *, foreground):
        self.launcher = self

    def state(self):
        return {"pid": self.pid}

    def stop(self, **kwargs):
        _FakeServer.stopped.append(kwargs)

    def forget_keys(self):
        pass


def _config(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "m.mar").write_bytes(b"only its name is looked at")
    config = tmp_path / "c.properties"
    config.write_text("inference_address=http://127.0.0.1:18080\nmanagement_address=http://127.0.0.1:18081\n"
                      "metrics_address=http://127.0.0.1:18082\n")
    return ["--config", str(config), "--model-store", str(store), "--state-file", str(tmp_path / "s.json"),
            "--run-dir", str(tmp_path / "run")]


def test_a_failure_right_after_start_stops_the_server_it_started(tmp_path, capsys, monkeypatch):
    """A full disk while writing the state file (or a closed stdout while announcing): `serve` ended and left Java
    serving with nothing that could find it to stop it."""
    import errno
    monkeypatch.setattr(ts_server, "TorchServe", _FakeServer)
    _FakeServer.stopped.clear()

    def full(*, path, obj):
        if str(path).endswith("s.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        from inference.atomic import write_json
        write_json(path=path, obj=obj)
    monkeypatch.setattr(ts_server, "write_json", full)
    assert run_cli(ts_server.main, ["serve", *_config(tmp_path)]) == 2
    assert _FakeServer.stopped and "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.starting.json").exists()


def test_a_second_serve_is_refused_while_the_first_holds_its_lock(tmp_path, capsys, monkeypatch):
    """Two `make serve` started together both passed the state-file checks (neither had written one yet): the
    first holds .torchserve/server.lock for its life, and the second is one line, whatever the timing."""
    from tests.conftest import lock_held_elsewhere
    monkeypatch.setattr(ts_server, "TorchServe", _FakeServer)
    monkeypatch.setattr(ts_server, "LOCK_WAIT", 0.3)  # how long it lets an exiting `serve` go (10 s)
    with lock_held_elsewhere(tmp_path, "s.lock") as holder:
        _FakeServer.stopped.clear()
        args = ["serve", *_config(tmp_path)]
        assert run_cli(ts_server.main, args) == 2  # after LOCK_WAIT: it could have been a serve that was exiting
        assert capsys.readouterr().err.strip() == (f"error: a `make serve` (PID {holder.pid}) is starting TorchServe "
                                                   "or serving with it: wait for it, or `make stop`")
        assert not (tmp_path / "s.starting.json").exists() and not _FakeServer.stopped
        # one that is starting (its starting file names a live serve) is refused at once, whatever LOCK_WAIT
        import time
        monkeypatch.setattr(ts_server, "LOCK_WAIT", 60)
        monkeypatch.setattr(ts_server, "_is_serve", lambda pid: pid == holder.pid)
        (tmp_path / "s.starting.json").write_text(f'{{"serve_pid": {holder.pid}}}')
        started = time.monotonic()
        assert run_cli(ts_server.main, args) == 2 and time.monotonic() - started < 5
        assert "is starting TorchServe" in capsys.readouterr().err


def test_stop_on_a_full_disk_removes_the_state_so_serve_knows_it_was_asked(tmp_path, capsys, monkeypatch):
    import errno
    import subprocess
    import sys
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "TorchServe"
    try:
        state = tmp_path / "s.json"
        state.write_text(f'{{"pid": {stand_in.pid}}}')
        monkeypatch.setattr(ts_server, "is_torchserve", lambda pid: True)

        def full(*, path, obj):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ts_server, "write_json", full)
        assert run_cli(ts_server.main, ["stop", "--state-file", str(state), "--drain-timeout", "0"]) == 0
        assert "removed it; stopping" in capsys.readouterr().out and not state.exists()
        assert stand_in.wait(timeout=10) is not None
    finally:
        stand_in.kill()


def test_a_server_listening_beyond_loopback_without_tokens_is_warned_about(capsys):
    server = _FakeServer()
    server.props = {"inference_address": "http://0.0.0.0:8080", "management_address": "http://127.0.0.1:8081",
                    "metrics_address": "http://127.0.0.1:8082", "grpc_inference_address": "127.0.0.1",
                    "grpc_management_address": "127.0.0.1"}
    ts_server._announce(server, "model_store", (7070, 7071))
    out, err = capsys.readouterr()
    assert "serving model_store at http://0.0.0.0:8080" in out
    assert "warning: listening beyond this machine (inference on 0.0.0.0)" in err
    server.props["inference_address"] = "http://127.0.0.1:8080"
    ts_server._announce(server, "model_store", (7070, 7071))
    assert capsys.readouterr().err == ""
