"""Audit the project's pinned dependencies for known vulnerabilities: a thin wrapper over pip-audit's command line.

    python scripts/audit.py                       # or: make audit
    python scripts/audit.py --service osv         # OSV instead of PyPI's vulnerability data
    python scripts/audit.py --require-service     # release pipelines: an unusable service is exit 3
    python scripts/audit.py -r requirements.txt   # a pinned requirements file instead of this venv

What is audited: the distributions installed in this interpreter's environment -- the venv `make setup` builds
from pyproject.toml's pins (every extra, plus foolbox) -- minus editable ones (the project itself), as listed by
`pip list --format=freeze --exclude-editable`, plus the serving image's CPU build of a GPU package installed here
(onnxruntime beside onnxruntime-gpu, same version: advisories are filed by project name). That list is handed to

    pip-audit --requirement PINS --no-deps --disable-pip --strict --vulnerability-service SERVICE
              --ignore-vuln ID ... --format json --output logs/audit.json --progress-spinner off --timeout N

so nothing is resolved or installed, and with --strict a package pip-audit cannot audit stops the audit instead
of being skipped while it still prints "No known vulnerabilities found".

The ignore file (deploy/audit-ignore.txt) has one `ID  # reason` per line; `#` lines and blank lines are
comments, an entry without a reason is an error. Each ID becomes `--ignore-vuln ID`: pip-audit matches it,
exactly as written, against a finding's id and its aliases (PYSEC-..., GHSA-..., CVE-...).

Exit status:
  0  no finding beyond the ignore file -- ALSO when the vulnerability service could not be used: the report
     then says "AUDIT NOT PERFORMED" with pip-audit's cause, and CI does not fail for a network problem;
  1  at least one finding that the ignore file does not list;
  2  usage or set-up error (pip-audit missing, malformed ignore file, unpinned requirement, any other failure);
  3  the service could not be used and --require-service was given.

"Could not be used" means pip-audit failed on the network (connection error, timeout, HTTP error from the
service) or, through --strict, found a package "not found on PyPI": the answer of a package mirror that serves
pip's simple API but not https://pypi.org/pypi/<name>/<version>/json, for every package.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IGNORE = REPO / "deploy" / "audit-ignore.txt"
DEFAULT_OUTPUT = REPO / "logs" / "audit.json"
# pip-audit's own messages when the service, not the set-up, is the problem.
UNUSABLE_SERVICE = re.compile(r"Dependency not found on PyPI|your network may be blocking this service|ServiceError"
                              r"|requests\.exceptions\.\w*(Connection|Timeout|SSL|Proxy)\w*")


class IgnoreFileError(ValueError):
    pass


def read_ignore_file(path: Path) -> dict[str, str]:
    """``ID  # reason`` per line; every entry must say why. Returns {ID as written: reason}."""
    entries: dict[str, str] = {}
    if not path.is_file():
        return entries
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ident, _, reason = (s.strip() for s in line.partition("#"))
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*-[A-Za-z0-9._:-]+", ident):
            raise IgnoreFileError(f"{path}:{n}: not a vulnerability id: {ident!r}")
        if not reason:
            raise IgnoreFileError(f"{path}:{n}: {ident} has no reason: write `{ident}  # why it does not apply`")
        entries[ident] = reason
    return entries


def installed_requirements() -> str:
    """This environment's distributions as `name==version` lines, editable installs left out (pip's own flags),
    and the serving image's CPU builds of the GPU packages installed here (``export.archive.CPU_PACKAGE``)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable",
                             "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    from packaging.utils import canonicalize_name

    from export.archive import CPU_PACKAGE
    pins = {canonicalize_name(name): version for name, _, version in (line.partition("==") for line in listed.split())}
    image = [f"{cpu}=={pins[canonicalize_name(gpu)]}" for gpu, cpu in CPU_PACKAGE.items()
             if canonicalize_name(gpu) in pins and canonicalize_name(cpu) not in pins]  # one pin per name
    return listed + "".join(line + "\n" for line in image)


def pip_audit_command(requirement: Path, service: str, ignores: dict[str, str], output: Path, timeout: int,
                      osv_url: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "pip_audit", "--requirement", str(requirement), "--no-deps", "--disable-pip",
           "--strict", "--vulnerability-service", service, "--format", "json", "--output", str(output),
           "--progress-spinner", "off", "--timeout", str(timeout)]
    cmd += ["--osv-url", osv_url] if osv_url else []
    for ident in ignores:
        cmd += ["--ignore-vuln", ident]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--service", choices=["pypi", "osv"], default="pypi", help="pip-audit --vulnerability-service")
    p.add_argument("--osv-url", help="pip-audit --osv-url (an OSV API other than api.osv.dev)")
    p.add_argument("-r", "--requirement", type=Path, help="audit this pinned requirements file instead of the venv")
    p.add_argument("--ignore-file", type=Path, default=DEFAULT_IGNORE, help="commented ignore list (%(default)s)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="pip-audit's JSON report (%(default)s)")
    p.add_argument("--timeout", type=int, default=15, help="pip-audit --timeout: seconds per request")
    p.add_argument("--require-service", action="store_true", help="exit 3 when the service cannot be used")
    args = p.parse_args(argv)
    try:
        ignores = read_ignore_file(args.ignore_file)
    except (IgnoreFileError, OSError) as e:
        print(f"audit: {e}", file=sys.stderr)
        return 2
    if args.requirement is not None and not args.requirement.is_file():
        print(f"audit: invalid requirements input: {args.requirement} not found (-r takes a pinned requirements "
              "file, one NAME==VERSION a line)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("pip_audit") is None:
        print("audit: pip-audit is not installed (make setup installs it with the dev extra)", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.unlink(missing_ok=True)  # pip-audit writes it only when it has something to report
    with tempfile.TemporaryDirectory() as tmp:
        requirement = args.requirement
        if requirement is None:
            requirement = Path(tmp) / "installed.txt"
            requirement.write_text(installed_requirements())
        lines = requirement.read_text().splitlines() if requirement.is_file() else []
        n_pins = sum(1 for line in lines if line.strip() and not line.lstrip().startswith(("#", "-")))
        cmd = pip_audit_command(requirement, args.service, ignores, args.output, args.timeout, args.osv_url)
        print("$ pip-audit " + " ".join(cmd[3:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + args.timeout * 2 * n_pins)
    stderr = proc.stderr.strip()
    summary = next((line for line in stderr.splitlines() if line.startswith(("Found ", "No known vuln"))), "")
    for ident, reason in ignores.items():
        print(f"ignored ({args.ignore_file}): {ident}  # {reason}")
    if proc.returncode == 0:
        print(f"audit done ({args.service}): {n_pins} package(s), 0 open findings. pip-audit: {summary}")
        return 0
    if proc.returncode == 1 and args.output.is_file():
        for dep in json.loads(args.output.read_text())["dependencies"]:
            for v in dep.get("vulns", []):
                print(f"{dep['name']:<24} {dep['version']:<12} {v['id']:<22} fixed in: "
                      f"{', '.join(v['fix_versions']) or 'no fix'}  aliases: {', '.join(v['aliases']) or '-'}")
        print(f"audit done ({args.service}): {n_pins} package(s), open findings (exit 1). pip-audit: {summary}")
        return 1
    if UNUSABLE_SERVICE.search(stderr):
        cause = [line for line in stderr.splitlines() if line.startswith("ERROR:")] or stderr.splitlines()[-1:]
        print(f"AUDIT NOT PERFORMED: pip-audit could not use the {args.service} vulnerability service.\n  "
              + "\n  ".join(cause))
        if "not found on PyPI" in stderr:
            print("  (--strict stops at the first such package; a package index mirror without PyPI's"
                  " /pypi/<name>/<version>/json answers this for every one)")
        print("  Run this where pypi.org or api.osv.dev is reachable for a real audit.")
        return 3 if args.require_service else 0
    print(f"audit: pip-audit failed (exit {proc.returncode}): {stderr[-2000:]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
