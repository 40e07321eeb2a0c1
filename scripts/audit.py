"""Audit the project's pinned dependencies for known vulnerabilities with pip-audit.

    python scripts/audit.py                 # or: python -m scripts.audit
    python scripts/audit.py --service osv   # OSV instead of PyPI's vulnerability data
    python scripts/audit.py --require-service   # release pipelines: an unreachable service is an error

What is audited: the dependency closure of pyproject.toml (its dependencies and every optional extra), as
installed in this interpreter's environment, plus the packages `make setup` installs beside it (foolbox).
It is written to a requirements file of exact `name==version` pins and given to
`pip-audit -r FILE --no-deps --disable-pip`: nothing is resolved or installed, and tools that merely share
the venv (pip-audit itself, pip) are not part of the report.

Exit status:
  0  no finding, or only findings listed in the ignore file (deploy/audit-ignore.txt) -- ALSO when the
     vulnerability service could not be reached: the report then says "AUDIT NOT PERFORMED" in capitals and
     CI does not fail for a network problem (--require-service turns this into exit 3);
  1  at least one finding that the ignore file does not list;
  2  usage or set-up error (pip-audit missing, malformed ignore file, pyproject unreadable).

pip-audit's default service queries https://pypi.org/pypi/<name>/<version>/json. A package index mirror
that serves the simple API but not that endpoint answers 404, which pip-audit reports as "Dependency not found
on PyPI" for every package and then prints "No known vulnerabilities found". This script recognises that case
as "service unreachable", not as a clean audit. It then falls back to the project endpoint
(/pypi/<name>/json), whose `vulnerabilities` field describes the LATEST release only: packages pinned at
their latest release get a real (partial) answer, the others are listed as not covered.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IGNORE = REPO / "deploy" / "audit-ignore.txt"
# Installed by `make setup` next to the project (data only, --no-deps): audited itself, its requirements are not.
EXTRA_ROOTS = ["foolbox"]
# Distributions that are not on PyPI and cannot be audited there: the project itself.
NOT_ON_PYPI = {"attention-classifier-serving"}
UNREACHABLE_MARKERS = ("ConnectionError", "NameResolutionError", "Max retries exceeded", "ConnectTimeout",
                       "ReadTimeout", "Failed to resolve", "Temporary failure in name resolution",
                       "Network is unreachable", "SSLError")


# -- what to audit ------------------------------------------------------------------------------------
@dataclass
class Closure:
    pins: dict[str, str] = field(default_factory=dict)          # canonical name -> installed version
    missing: dict[str, str] = field(default_factory=dict)       # required but not installed -> by whom
    drift: dict[str, tuple[str, str]] = field(default_factory=dict)  # pyproject pin differs from installed


def pyproject_roots(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra_reqs in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra_reqs]
    return reqs


def dependency_closure(roots: list[Requirement], extra_roots: list[str] = EXTRA_ROOTS) -> Closure:
    """Walk installed distributions from the roots, following markers and requested extras."""
    closure = Closure()
    todo: list[tuple[Requirement, str]] = [(r, "pyproject.toml") for r in roots]
    todo += [(Requirement(n), "make setup") for n in extra_roots]
    seen: set[tuple[str, frozenset]] = set()
    for req, _ in todo:
        pinned = [s.version for s in req.specifier if s.operator == "=="]
        if pinned and req.marker is None:
            try:
                installed = md.version(req.name)
            except md.PackageNotFoundError:
                continue
            if installed != pinned[0]:
                closure.drift[canonicalize_name(req.name)] = (pinned[0], installed)
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            if req.name not in extra_roots:
                closure.missing.setdefault(name, parent)
            continue
        closure.pins[name] = dist.version
        if parent == "make setup":  # installed with --no-deps: its own requirements are not part of the set
            continue
        for dep in dist.requires or []:
            r = Requirement(dep)
            if r.marker is not None:
                wanted = [""] + sorted(req.extras)
                if not any(r.marker.evaluate({"extra": e}) for e in wanted):
                    continue
            todo.append((r, f"{name}=={dist.version}"))
    return closure


# -- the ignore file ----------------------------------------------------------------------------------
class IgnoreFileError(ValueError):
    pass


def read_ignore_file(path: Path) -> dict[str, str]:
    """``ID  # reason`` per line; every entry must say why. Returns {ID (upper case): reason}."""
    entries: dict[str, str] = {}
    if not path.is_file():
        return entries
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ident, _, reason = line.partition("#")
        ident, reason = ident.strip(), reason.strip()
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*-[A-Za-z0-9._:-]+", ident):
            raise IgnoreFileError(f"{path}:{n}: not a vulnerability id: {ident!r}")
        if not reason:
            raise IgnoreFileError(f"{path}:{n}: {ident} has no reason: write `{ident}  # why it does not apply`")
        entries[ident.upper()] = reason
    return entries


# -- running pip-audit and reading its answer ---------------------------------------------------------
@dataclass
class Finding:
    package: str
    version: str
    vuln_id: str
    aliases: list[str]
    fix_versions: list[str]
    description: str = ""
    ignored_because: str | None = None


@dataclass
class Report:
    service: str
    audited: int = 0
    findings: list[Finding] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)     # package -> reason
    unreachable: str | None = None                             # why the service was not usable
    fallback: dict[str, str] = field(default_factory=dict)    # package -> coverage note (fallback mode)

    @property
    def open_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.ignored_because is None]


def run_pip_audit(pins: dict[str, str], service: str, timeout: int) -> tuple[int, str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
        req_file = fh.name
    try:
        cmd = [sys.executable, "-m", "pip_audit", "-r", req_file, "--no-deps", "--disable-pip",
               "--format", "json", "--progress-spinner", "off", "--vulnerability-service", service,
               "--timeout", str(timeout)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(120, timeout * len(pins)))
        return proc.returncode, proc.stdout, proc.stderr
    finally:
        os.unlink(req_file)


def interpret(service: str, rc: int, stdout: str, stderr: str, pins: dict[str, str],
              ignores: dict[str, str]) -> Report:
    report = Report(service=service)
    try:
        data = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        data = None
    if data is None:
        hit = next((m for m in UNREACHABLE_MARKERS if m in stderr), None)
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}, no output"
        report.unreachable = f"pip-audit could not query {service}: {last}" if hit else None
        if report.unreachable is None:
            raise RuntimeError(f"pip-audit failed (exit {rc}): {stderr.strip()[-2000:]}")
        return report
    for dep in data.get("dependencies", []):
        name, version = dep.get("name", "?"), dep.get("version", pins.get(dep.get("name", ""), "?"))
        if "skip_reason" in dep:
            report.skipped[name] = dep["skip_reason"]
            continue
        report.audited += 1
        for v in dep.get("vulns", []):
            report.findings.append(Finding(name, version, v["id"], v.get("aliases", []), v.get("fix_versions", []),
                                           v.get("description", "")))
    auditable = [n for n in pins if n not in NOT_ON_PYPI]
    not_found = [n for n, why in report.skipped.items() if "not found on PyPI" in why and n not in NOT_ON_PYPI]
    if auditable and report.audited == 0 and len(not_found) >= len(auditable):
        report.unreachable = (f"every package was skipped as 'not found on PyPI' ({len(not_found)} of "
                              f"{len(auditable)}): the index at pypi.org does not serve /pypi/<name>/<version>/json "
                              "(a mirror?), so pip-audit's 'No known vulnerabilities found' means nothing here")
    apply_ignores(report.findings, ignores)
    return report


def apply_ignores(findings: list[Finding], ignores: dict[str, str]) -> None:
    for f in findings:
        for ident in [f.vuln_id, *f.aliases]:
            if ident.upper() in ignores:
                f.ignored_because = ignores[ident.upper()]
                break


def project_json_fallback(report: Report, pins: dict[str, str], ignores: dict[str, str],
                          index: str = "https://pypi.org", timeout: int = 15) -> None:
    """Partial audit from /pypi/<name>/json: its `vulnerabilities` are those of the latest release."""
    for name, version in sorted(pins.items()):
        if name in NOT_ON_PYPI:
            continue
        try:
            with urllib.request.urlopen(f"{index}/pypi/{name}/json", timeout=timeout) as r:
                data = json.load(r)
        except (urllib.error.URLError, OSError, ValueError) as e:
            report.fallback[name] = f"not covered (project JSON unavailable: {e})"
            continue
        latest = (data.get("info") or {}).get("version")
        if latest != version:
            report.fallback[name] = f"not covered (pinned {version}, the index describes {latest})"
            continue
        if "vulnerabilities" not in data:
            report.fallback[name] = "not covered (the index gives no vulnerability data)"
            continue
        report.fallback[name] = "covered (pinned release is the latest)"
        report.audited += 1
        for v in data["vulnerabilities"]:
            report.findings.append(Finding(name, version, v.get("id", "?"), v.get("aliases") or [],
                                           v.get("fixed_in") or [], v.get("details") or v.get("summary") or ""))
    apply_ignores(report.findings, ignores)


# -- output -------------------------------------------------------------------------------------------
def render(report: Report, closure: Closure, ignore_path: Path) -> str:
    out = [f"pip-audit ({report.service}) over {len(closure.pins)} installed distributions of the "
           f"pyproject.toml closure"]
    if report.unreachable:
        out.append("")
        out.append("AUDIT NOT PERFORMED: the vulnerability service could not be used.")
        out.append(f"  {report.unreachable}")
        if report.fallback:
            covered = sorted(n for n, s in report.fallback.items() if s.startswith("covered"))
            out.append(f"  Fallback (project JSON, latest releases only): {len(covered)} of {len(report.fallback)} "
                       f"packages covered: {', '.join(covered) or '-'}")
            missed = {n: s for n, s in report.fallback.items() if n not in covered}
            if missed:
                out.append("  Not covered: " + "; ".join(
                    f"{n} {s.removeprefix('not covered ')}" for n, s in sorted(missed.items())))
        out.append("  Run this where pypi.org or api.osv.dev is reachable for a full audit.")
    if report.findings:
        out.append("")
        out.append(f"{'package':<24} {'version':<12} {'id':<22} fixed in / status")
        for f in sorted(report.findings, key=lambda f: (f.package, f.vuln_id)):
            status = f"IGNORED ({f.ignored_because})" if f.ignored_because else ", ".join(f.fix_versions) or "no fix"
            out.append(f"{f.package:<24} {f.version:<12} {f.vuln_id:<22} {status}")
            if f.aliases:
                out.append(f"{'':<61}aliases: {', '.join(f.aliases)}")
    real_skips = {n: w for n, w in report.skipped.items() if not report.unreachable or n in NOT_ON_PYPI}
    if real_skips:
        out.append("")
        out.append("not audited: " + "; ".join(f"{n} ({w})" for n, w in sorted(real_skips.items())))
    if closure.missing:
        out.append("required but not installed (not audited): "
                   + ", ".join(f"{n} (by {p})" for n, p in sorted(closure.missing.items())))
    if closure.drift:
        out.append("installed version differs from pyproject.toml (run make setup): "
                   + ", ".join(f"{n} pinned {a}, installed {b}" for n, (a, b) in sorted(closure.drift.items())))
    out.append("")
    n_ign = len(report.findings) - len(report.open_findings)
    verdict = "NOT PERFORMED (service unreachable)" if report.unreachable and not report.fallback else (
        "PARTIAL (fallback)" if report.unreachable else "done")
    out.append(f"audit {verdict}: {len(report.open_findings)} open finding(s), {n_ign} ignored "
               f"({ignore_path}), {report.audited} package(s) audited")
    return "\n".join(out)


def exit_status(report: Report, require_service: bool) -> int:
    if report.open_findings:
        return 1
    if report.unreachable and require_service:
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--service", choices=["pypi", "osv"], default="pypi", help="pip-audit vulnerability service")
    p.add_argument("--ignore-file", type=Path, default=DEFAULT_IGNORE, help="commented ignore list (%(default)s)")
    p.add_argument("--timeout", type=int, default=15, help="seconds per request")
    p.add_argument("--no-fallback", action="store_true", help="no project-JSON fallback when the service is unusable")
    p.add_argument("--require-service", action="store_true", help="exit 3 when the service cannot be used")
    p.add_argument("--print-requirements", action="store_true", help="print the audited pins and stop")
    args = p.parse_args(argv)
    try:
        ignores = read_ignore_file(args.ignore_file)
        closure = dependency_closure(pyproject_roots())
    except (IgnoreFileError, OSError, KeyError, tomllib.TOMLDecodeError) as e:
        print(f"audit: {e}", file=sys.stderr)
        return 2
    if args.print_requirements:
        print("".join(f"{n}=={v}\n" for n, v in sorted(closure.pins.items())), end="")
        return 0
    try:
        import pip_audit  # noqa: F401
    except ImportError:
        print("audit: pip-audit is not installed (pip install pip-audit==2.10.1)", file=sys.stderr)
        return 2
    rc, stdout, stderr = run_pip_audit(closure.pins, args.service, args.timeout)
    try:
        report = interpret(args.service, rc, stdout, stderr, closure.pins, ignores)
    except RuntimeError as e:
        print(f"audit: {e}", file=sys.stderr)
        return 2
    if report.unreachable and not args.no_fallback:
        project_json_fallback(report, closure.pins, ignores, timeout=args.timeout)
    print(render(report, closure, args.ignore_file))
    return exit_status(report, args.require_service)


if __name__ == "__main__":
    sys.exit(main())
