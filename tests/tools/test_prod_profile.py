"""The locked-down profile without a TorchServe: what its ``allowed_urls`` matches (TorchServe 0.12's
decision for each kind of registration URL follows from that; tests/integration/test_prod_config.py
checks the decisions on a real server), where the keys are read from, and the log configuration the
drain relies on."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from tools import REPO
from tools.torchserve import ACCESS_LOG_PATTERN, TorchServe, log_config, read_properties

PROD = REPO / "config.prod.properties"


def java_property(path, key: str) -> str:
    """``key``'s value as java.util.Properties reads it (backslash escapes resolved; no continuation lines here)."""
    for raw in path.read_text().splitlines():
        text = raw.strip()
        if text.startswith(("#", "!")) or "=" not in text:
            continue
        k, v = text.split("=", 1)
        if k.strip() == key:
            return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(m[1], m[1]), v.strip())
    raise KeyError(key)


def allowed(url: str) -> bool:
    """TorchServe's ArchiveUtils.validateURL: any pattern of the comma-separated list, matched whole,
    case-insensitively."""
    return any(re.fullmatch(p, url, re.I) for p in java_property(PROD, "allowed_urls").split(","))


# Matched: TorchServe tries java.net.URL on it, and a path or a name already in the store fails
# ("Failed to download" / "Model file already exists") before anything is fetched.
MATCHED = ["/tmp/elsewhere/model_dir", "/tmp/elsewhere/x.mar", "model_store/x.mar", "sub/x.mar", "folder",
           "folder/", "/abs/store/x.mar", "x.tar.gz", "x.mar/", ".mar", "-x.mar", "x.mar\n", "x.MAR.zip",
           "ftp://127.0.0.1/", "ftp://127.0.0.1", "jar:file:/tmp/x.mar!/", "jar:http://evil/x.jar!/",
           "ftp://h/dir/?q=1", "ftp://h/dir\\", "mailto:"]
# Not matched: http(s):// and file:// are refused ("does not match any allowed URL(s)"); other
# schemes go to the on-disk lookup, which uses only their file name, in the store; bare names too.
NOT_MATCHED = ["x.mar", "fmnist.mar", "shapes_v2.mar", "Model-1.0.MAR", "https://example.com/x.mar",
               "http://127.0.0.1:8000/x.mar", "HTTP://EXAMPLE.COM/", "file:///tmp/x.mar", "fil://x", "file://",
               "ftp://h/x.mar", "jar:file:/tmp/a.zip!/x.mar", "mailto:someone", "C:\\models\\x.mar"]


@pytest.mark.parametrize("url", MATCHED)
def test_allowed_urls_matches_everything_but_bare_archive_names_and_urls(url):
    assert allowed(url), url


@pytest.mark.parametrize("url", NOT_MATCHED)
def test_allowed_urls_leaves_bare_archive_names_and_urls_unmatched(url):
    assert not allowed(url), url


def test_allowed_urls_survives_the_properties_file_and_has_no_comma():
    value = java_property(PROD, "allowed_urls")
    assert "," not in value  # TorchServe splits the list on commas
    assert "[/\\\\]" in value  # the file's [/\\\\] is [/\\] once Properties has read it: slash or backslash
    for pattern in value.split(","):
        re.compile(pattern)


def test_prod_profile_keeps_registration_off_and_tokens_on():
    props = {k: java_property(PROD, k) for k in ("enable_model_api", "metrics_mode")}
    assert props == {"enable_model_api": "false", "metrics_mode": "prometheus"}
    with pytest.raises(KeyError):
        java_property(PROD, "disable_token_authorization")


def test_keys_are_read_from_the_working_directory(tmp_path):
    server = TorchServe(model_store=tmp_path, config=PROD, workdir=tmp_path / "run")
    assert server.token_auth and server.key_file == tmp_path / "run" / "key_file.json"
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    with pytest.raises(TimeoutError):
        server.keys(timeout=0.3)
    server.key_file.write_text('{"management": {"key": "M"')  # TorchServe writes it in pieces
    with pytest.raises(TimeoutError):
        server.keys(timeout=0.3)
    server.key_file.write_text(json.dumps({"management": {"key": "M", "expiration time": "x"},
                                           "inference": {"key": "I", "expiration time": "x"}, "API": {"key": "A"}}))
    assert server.keys() == {"inference": "I", "management": "M", "api": "A"}
    assert server.auth() == {"Authorization": "Bearer I"} and server.auth("management") == {"Authorization": "Bearer M"}
    state = server.state()
    assert state["key_file"] == str(server.key_file) and "pid" in state
    server.stop()  # never started: nothing to end, and the void keys are removed
    assert not server.key_file.exists()
    written = (tmp_path / "run" / "config.properties").read_text()
    assert f"allowed_urls={read_properties(PROD)['allowed_urls']}\n" in written  # verbatim, escapes and all


def test_the_dev_profile_needs_no_keys(tmp_path):
    server = TorchServe(model_store=tmp_path)
    try:
        assert not server.token_auth and server.keys() == {} and server.auth() == {}
        assert server.state()["key_file"] is None
    finally:
        server.__exit__()


def test_log_config_adds_the_thread_to_the_access_log_and_the_workers_trace(tmp_path):
    path = log_config(tmp_path / "log4j2.xml")
    assert path is not None
    text = path.read_text()
    access = text[text.index('name="access_log"'):]
    assert access[:access.index("</RollingFile>")].count(f'pattern="{ACCESS_LOG_PATTERN}"') == 1
    assert text.count("[%t]") == 1 and 'name="ts_log"' in text
    # the drain's worker activity: TRACE for the queue's "get first job", into ts_log.log alone (additivity off:
    # through the root logger it also went to STDOUT, a foreground make serve's terminal)
    loggers = ET.fromstring(text).find("Loggers")
    model = [e for e in loggers if e.get("name") == "org.pytorch.serve.wlm.Model"]
    assert len(model) == 1 and model[0].get("level") == "trace" and model[0].get("additivity") == "false"
    assert [(r.tag, r.get("ref")) for r in model[0]] == [("AppenderRef", "ts_log")]
