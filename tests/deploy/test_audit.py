"""scripts/audit.py, a thin wrapper over pip-audit, run with the real pip-audit: the ignore file, what is audited,
findings and ignores against a local fake OSV service, an unusable service (AUDIT NOT PERFORMED, including the
package mirror that makes pip-audit skip everything), and set-up errors."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts import audit
from tests.conftest import json_server

# jinja2 2.10 really is vulnerable (sandbox escape, fixed in 2.10.1): the fake OSV answers what api.osv.dev does.
JINJA_VULN = {"id": "GHSA-462w-v97r-4m45", "aliases": ["CVE-2019-10906", "PYSEC-2019-217"],
              "summary": "Jinja2 sandbox escape via string formatting",
              "affected": [{"package": {"name": "jinja2", "ecosystem": "PyPI"},
                            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.10.1"}]}]}]}
VULNERABLE = {("jinja2", "2.10"): [JINJA_VULN]}


@pytest.fixture
def fake_osv():
    """An OSV /v1/query endpoint on loopback; yields (url, the (name, version) pairs it was asked about)."""
    queries: list[tuple[str, str]] = []

    def answer(body: bytes) -> dict:
        q = json.loads(body)
        key = (q["package"]["name"], q["version"])
        queries.append(key)
        return {"vulns": VULNERABLE[key]} if key in VULNERABLE else {}

    with json_server(answer) as url:
        yield f"{url}/v1/query", queries


@pytest.fixture
def reqs(tmp_path):
    f = tmp_path / "requirements.txt"
    f.write_text("jinja2==2.10\nmarkupsafe==1.1.1\n")
    return f


def run(tmp_path, capsys, *args: str, ignore: str = "") -> tuple[int, str, str]:
    (tmp_path / "ignore.txt").write_text(ignore)
    rc = audit.main([*args, "--ignore-file", str(tmp_path / "ignore.txt"), "--output", str(tmp_path / "out.json")])
    out, err = capsys.readouterr()
    return rc, out, err


# -- the ignore file ------------------------------------------------------------------------------------
def test_the_repositorys_ignore_file_is_valid():
    audit.read_ignore_file(audit.DEFAULT_IGNORE)


def test_ignore_entries_need_a_reason_and_become_ignore_vuln_flags(tmp_path):
    f = tmp_path / "ignore.txt"
    f.write_text("# header\nGHSA-aaaa-bbbb-cccc  # handler never parses XML; revisit 2027-01-01\n\nPYSEC-2026-1 # n/a\n")
    entries = audit.read_ignore_file(f)
    assert entries == {"GHSA-aaaa-bbbb-cccc": "handler never parses XML; revisit 2027-01-01", "PYSEC-2026-1": "n/a"}
    cmd = audit.pip_audit_command(tmp_path / "r.txt", "pypi", entries, tmp_path / "o.json", 15)
    assert " --ignore-vuln GHSA-aaaa-bbbb-cccc --ignore-vuln PYSEC-2026-1" in " ".join(cmd)
    f.write_text("CVE-2026-1234\n")
    with pytest.raises(audit.IgnoreFileError, match="no reason"):
        audit.read_ignore_file(f)
    f.write_text("torch  # everything in torch\n")
    with pytest.raises(audit.IgnoreFileError, match="not a vulnerability id"):
        audit.read_ignore_file(f)


# -- what is audited ------------------------------------------------------------------------------------
def test_what_is_audited_is_the_venv_as_pyproject_pins_it():
    pins = {canonicalize_name(r.name): str(r.specifier)[2:] for r in map(Requirement, audit.installed_requirements()
                                                                         .split())}
    project = tomllib.loads((audit.REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in
                [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]]
    assert {"torch", "torchvision", "torchserve", "onnx", "pytest", "foolbox"} <= set(pins)
    assert {"filelock", "jinja2"} <= set(pins), "transitive dependencies are included"
    assert "attention-classifier-serving" not in pins, "the editable project itself is not on PyPI"
    assert pins["onnxruntime"] == pins["onnxruntime-gpu"], "the image's onnxruntime is audited by its own name"
    drift = {r.name: (str(r.specifier), pins.get(canonicalize_name(r.name))) for r in declared
             if r.marker is None and pins.get(canonicalize_name(r.name)) not in r.specifier}
    assert not drift, f"the venv does not match pyproject.toml (run make setup): {drift}"


def test_the_whole_venv_goes_to_pip_audit(fake_osv, tmp_path, capsys):
    url, queries = fake_osv
    rc, out, err = run(tmp_path, capsys, "--service", "osv", "--osv-url", url)
    assert rc == 0, out + err
    asked = {name for name, _ in queries}
    assert {"torch", "foolbox", "jinja2", "pip-audit"} <= asked and "attention-classifier-serving" not in asked
    assert f"audit done (osv): {len(queries)} package(s), 0 open findings" in out


# -- findings -------------------------------------------------------------------------------------------
def test_a_finding_fails_unless_the_ignore_file_lists_it_or_an_alias(fake_osv, tmp_path, capsys, reqs):
    url, queries = fake_osv
    rc, out, err = run(tmp_path, capsys, "--service", "osv", "--osv-url", url, "-r", str(reqs))
    assert rc == 1, out + err
    assert sorted(queries) == [("jinja2", "2.10"), ("markupsafe", "1.1.1")]
    finding = next(line for line in out.splitlines() if line.startswith("jinja2"))
    assert "2.10" in finding and "PYSEC-2019-217" in finding and "fixed in: 2.10.1" in finding
    assert "CVE-2019-10906" in finding and "open findings (exit 1)" in out
    report = json.loads((tmp_path / "out.json").read_text())
    assert [d["name"] for d in report["dependencies"] if d["vulns"]] == ["jinja2"]

    rc, out, err = run(tmp_path, capsys, "--service", "osv", "--osv-url", url, "-r", str(reqs),
                       ignore="GHSA-1234-5678-9abc  # another advisory\n")
    assert rc == 1, "an unrelated ignore entry does not hide the finding"

    rc, out, err = run(tmp_path, capsys, "--service", "osv", "--osv-url", url, "-r", str(reqs),
                       ignore="CVE-2019-10906  # no user-supplied templates are rendered; revisit 2027-01-01\n")
    assert rc == 0, out + err
    assert "ignored (" in out and "CVE-2019-10906  # no user-supplied templates" in out
    assert "0 open findings. pip-audit: No known vulnerabilities found, 1 ignored" in out


# -- an unusable service --------------------------------------------------------------------------------
def test_an_unreachable_service_is_reported_not_failed(tmp_path, capsys, reqs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1/query"  # nothing listens once closed
    rc, out, err = run(tmp_path, capsys, "--service", "osv", "--osv-url", closed, "-r", str(reqs))
    assert rc == 0, out + err
    assert "AUDIT NOT PERFORMED" in out and "ConnectionError" in out and "127.0.0.1" in out
    rc, out, err = run(tmp_path, capsys, "--service", "osv", "--osv-url", closed, "-r", str(reqs), "--require-service")
    assert rc == 3 and "AUDIT NOT PERFORMED" in out


def test_pypi_service_either_audits_for_real_or_says_not_performed(tmp_path, capsys, reqs):
    """Here the index is a mirror without /pypi/<name>/<version>/json, so pip-audit finds every package "not
    found on PyPI" and, without --strict, would still say "No known vulnerabilities found". Where pypi.org is
    reachable the real service must report jinja2 2.10. A clean pass is neither, and fails."""
    rc, out, err = run(tmp_path, capsys, "-r", str(reqs))
    if rc == 0:
        assert "AUDIT NOT PERFORMED" in out and "audit done" not in out, out + err
        assert "not found on PyPI" in out or "Error" in out, out
    else:
        assert rc == 1 and "CVE-2019-10906" in out, out + err


# -- set-up errors --------------------------------------------------------------------------------------
def test_set_up_errors_fail(tmp_path, capsys, monkeypatch):
    unpinned = tmp_path / "unpinned.txt"
    unpinned.write_text("requests>=2\n")
    rc, out, err = run(tmp_path, capsys, "-r", str(unpinned))
    assert rc == 2 and "pip-audit failed" in err and "requests" in err
    rc, out, err = run(tmp_path, capsys, "-r", str(tmp_path / "missing.txt"))
    assert rc == 2 and "invalid requirements input" in err
    rc, out, err = run(tmp_path, capsys, "-r", str(unpinned), ignore="CVE-2026-1234\n")
    assert rc == 2 and "has no reason" in err
    monkeypatch.setattr(audit.importlib.util, "find_spec", lambda name: None)
    rc, out, err = run(tmp_path, capsys, "-r", str(unpinned))
    assert rc == 2 and "pip-audit is not installed" in err


@pytest.mark.slow
def test_ci_runs_the_audit_and_shows_its_report():
    """CI's audit of the venv: the report is printed (pytest -rA / the CI log) and kept in logs/; a finding is
    reported, not gated here (make audit exits 1 on it); only a broken set-up (exit 2) fails this test."""
    proc = subprocess.run([sys.executable, str(audit.REPO / "scripts" / "audit.py")], cwd=audit.REPO,
                          capture_output=True, text=True, timeout=600)
    report = audit.REPO / "logs" / "audit-report.txt"  # kept for the CI log readers
    report.parent.mkdir(exist_ok=True)
    report.write_text(proc.stdout + proc.stderr)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "AUDIT NOT PERFORMED" in proc.stdout or "audit done (pypi)" in proc.stdout
