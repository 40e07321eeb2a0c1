"""The architecture as the imports show it: every module imports, dependencies point one way.

* ``inference`` (the core) imports only torch, torchvision, Pillow, numpy and the standard library at
  module level (the runtimes lazily, inside functions), and never ``training``/``export``/``handlers``.
* ``training`` and ``export`` use the core; ``handlers`` uses only the core (and TorchServe).
* ``tools`` (shared by scripts, benchmarks and tests; it drives training and export) is below ``scripts``
  and ``benchmarks``; nothing outside ``tests`` imports ``tests``, and
  ``scripts`` never imports ``benchmarks``.
"""
import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("inference", "training", "export", "handlers", "tools", "scripts", "benchmarks")
CORE_THIRD_PARTY = {"torch", "torchvision", "PIL", "numpy"}
CORE_LAZY = {"onnxruntime", "openvino"}
# what each top-level package may import from this repository
ALLOWED = {
    "inference": {"inference"},
    "training": {"inference", "training"},
    "export": {"inference", "training", "export"},
    "handlers": {"inference"},
    "tools": {"inference", "training", "export", "tools"},
    "scripts": {"inference", "training", "export", "tools", "scripts"},
    "benchmarks": {"inference", "training", "export", "handlers", "tools", "benchmarks"},
}
MAX_LINES = 300  # per module of the core and of the handler


def sources(pkg: str) -> list:
    """The package's modules, not what its hidden work folders hold (benchmarks/.work: exports' copies of
    the core)."""
    return [p for p in sorted((REPO / pkg).rglob("*.py"))
            if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]


def modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sources(pkg):
            rel = path.relative_to(REPO).with_suffix("")
            out.append(".".join(p for p in rel.parts if p != "__init__") if rel.name != "__init__"
                       else ".".join(rel.parts[:-1]))
    return out


def imports(path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add(path.relative_to(REPO).parts[0])  # relative: its own package
    return names


def test_every_module_imports():
    """One clean interpreter imports every module of the repository (a stale import fails here)."""
    names = modules()
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint(len(sys.argv) - 1)"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == len(names) > 40


def test_locustfile_imports():
    proc = subprocess.run([sys.executable, "-c", "import locustfile"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_dependencies_point_one_way(pkg):
    local = set(PACKAGES) | {"tests", "locustfile"}
    for path in sources(pkg):
        wrong = (imports(path) & local) - ALLOWED[pkg]
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_the_core_imports_only_torch_torchvision_pillow_numpy():
    stdlib = set(sys.stdlib_module_names)
    for path in sorted((REPO / "inference").glob("*.py")):
        top = imports(path, top_level_only=True) - stdlib - {"inference", "__future__"}
        assert top <= CORE_THIRD_PARTY, f"{path.name} imports {sorted(top - CORE_THIRD_PARTY)} at module level"
        lazy = imports(path) - stdlib - {"inference", "__future__"} - CORE_THIRD_PARTY
        assert lazy <= CORE_LAZY, f"{path.name} imports {sorted(lazy - CORE_LAZY)}"


@pytest.mark.parametrize("folder", ["inference", "handlers"])
def test_core_and_handler_modules_are_small_and_say_what_they_hold(folder):
    for path in sorted((REPO / folder).glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: {len(text.splitlines())} lines"
        if path.name != "__init__.py" or folder == "inference":
            assert ast.get_docstring(ast.parse(text)), f"{path.name} has no opening docstring"


def test_the_readmes_layout_names_every_module():
    """README's Layout is where a reader looks for what each module is: a module it leaves out is hidden."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    missing = [f"{pkg}/{p.name}" for pkg in PACKAGES for p in sources(pkg)
               if p.parent == REPO / pkg and p.name not in ("__init__.py", "__main__.py") and p.name not in block]
    assert not missing, f"README's Layout does not name: {missing}"


def test_every_command_line_parses_its_options():
    """README: every command has --help, and a mistyped option is refused (argparse's exit status 2); a module
    run as a script without a parser printed its output for --help and did its default for a typo of --write."""
    mains = [p for pkg in PACKAGES for p in sources(pkg)
             if p.name != "__main__.py" and '__name__ == "__main__"' in p.read_text()]
    assert len(mains) >= 15, mains  # benchmarks.*, scripts.*, tools.image_constraints
    missing = [str(p.relative_to(REPO)) for p in mains if "argparse.ArgumentParser(" not in p.read_text()]
    assert not missing, f"run as commands, without an argparse parser: {missing}"
    proc = subprocess.run([sys.executable, "-m", "tools.image_constraints", "--wirte"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --wirte" in proc.stderr and proc.stdout == ""
