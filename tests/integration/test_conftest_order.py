"""tests/integration/conftest.py's ordering: one block, the shared server's modules first, also under ``--ff``."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import group_server_users_first

HERE = Path(__file__).parent
REPO = HERE.parent.parent


class _Item:  # what the hook reads of a pytest item (hashable, as pytest's are)
    def __init__(self, module: str, *, folder: Path = HERE, server: bool = False):
        self.path, self.module, self.name = folder / f"{module}.py", module, module
        self.fixturenames = ["server"] if server else []


_item = _Item


def test_the_server_modules_run_first_in_one_block_where_the_first_one_was():
    unit = [_item(f"u{i}", folder=REPO / "tests" / "inference") for i in range(3)]
    own, soak = _item("own_photos"), _item("soak")
    a1, a2, b = _item("a", server=True), _item("a"), _item("b", server=True)
    items = [unit[0], soak, unit[1], a1, own, a2, b, unit[2]]  # --ff moved the failed soak test up
    group_server_users_first(items, HERE)
    assert [i.name for i in items] == ["u0", "a", "a", "b", "soak", "own_photos", "u1", "u2"]


@pytest.mark.slow  # a pytest process that imports every integration module: ~10 s on 2 cores
def test_failed_first_does_not_undo_the_grouping(tmp_path):
    """pytest's ``--ff`` moves failed tests to the front in a hook wrapper of its own: ours must run after it."""
    failed = "tests/integration/test_soak.py::test_soak_60s_no_failures_no_latency_creep_no_memory_growth"
    cache = tmp_path / "cache"
    (cache / "v" / "cache").mkdir(parents=True)
    (cache / "v" / "cache" / "lastfailed").write_text(json.dumps({failed: True}))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--ff", "-o", f"cache_dir={cache}",
                          "-p", "no:randomly", "tests/integration"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    modules = [line.split("::")[0] for line in out.stdout.splitlines() if line.startswith("tests/integration/")]
    assert modules[0] != "tests/integration/test_soak.py"  # where --ff alone puts it
    shared = [n for n, m in enumerate(modules) if m in ("tests/integration/test_torchserve.py",
                                                         "tests/integration/test_protocols.py")]
    own = [n for n, m in enumerate(modules) if m in ("tests/integration/test_soak.py",
                                                      "tests/integration/test_own_photos.py")]
    assert shared and own and max(shared) < min(own)  # the servers of their own start after the shared one's users
