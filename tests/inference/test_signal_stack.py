"""inference.signal_stack: signals still reach Python after OpenVINO CPU plugins come and go.

Each case runs in a fresh process (a broken alternate stack kills the process that has it): OpenVINO is
used the way the case says, then the process signals itself; a handler installed by Python runs on the
alternate stack, so a stack that OpenVINO left unmapped ends the process with SIGSEGV instead."""
from __future__ import annotations

import subprocess
import sys

import pytest

from inference.signal_stack import current_signal_stack, keep_signal_stack
from tests.conftest import REPO

pytest.importorskip("openvino")

_CASE = r'''
import faulthandler, gc, os, signal, sys
import numpy as np, openvino as ov, openvino.opset13 as ops
faulthandler.enable()  # as pytest does: Python's own alternate stack
signal.signal(signal.SIGUSR1, lambda *a: print("handled", flush=True))
p = ops.parameter([1, 4], np.float32)
ov.save_model(ov.Model([ops.relu(p)], [p]), sys.argv[2])

def raw_core():  # what NNCF's engines do: a Core of their own whose CPU plugin dies with it
    core = ov.Core(); core.compile_model(sys.argv[2], "CPU"); return core

case = sys.argv[1]
if case == "backends":  # two of our backends, dropped in the order they were made
    from inference.backends import OpenVINOBackend
    a = OpenVINOBackend(sys.argv[2]); b = OpenVINOBackend(sys.argv[2])
    del a; gc.collect(); del b; gc.collect()
elif case == "kept":   # plugins of Core objects that are not ours, under keep_signal_stack
    from inference.signal_stack import keep_signal_stack
    with keep_signal_stack():
        a = raw_core(); b = raw_core(); del a; gc.collect()
    del b; gc.collect()
elif case == "repaired":  # a Core per graph, each dropped while the next lives: found by conftest, then repaired
    from inference.signal_stack import current_signal_stack, openvino_core, set_signal_stack, unmapped_signal_stack
    python_stack = current_signal_stack()
    openvino_core()
    for _ in range(2):
        compiled = ov.Core().compile_model(sys.argv[2], "CPU")
    del compiled; gc.collect()
    print("unmapped" if unmapped_signal_stack() else "mapped", flush=True)
    assert set_signal_stack(python_stack) and unmapped_signal_stack() is None
os.kill(os.getpid(), signal.SIGUSR1)
print("alive", flush=True)
'''


@pytest.mark.parametrize("case", ["backends", "kept", "repaired"])
def test_signals_are_delivered_after_openvino_plugins_are_destroyed(case, tmp_path):
    done = subprocess.run([sys.executable, "-c", _CASE, case, str(tmp_path / "relu.xml")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    expected = (["unmapped"] if case == "repaired" else []) + ["handled", "alive"]
    assert done.returncode == 0 and done.stdout.split() == expected, (done.returncode, done.stdout, done.stderr[-2000:])


def test_keep_signal_stack_puts_the_stack_back():
    import ctypes

    before = current_signal_stack()
    buffer = ctypes.create_string_buffer(1 << 16)
    from inference.signal_stack import _libc, _StackT
    with keep_signal_stack():
        other = _StackT(ctypes.cast(buffer, ctypes.c_void_p), 0, len(buffer))
        assert _libc().sigaltstack(ctypes.byref(other), None) == 0
        assert current_signal_stack()[0] == ctypes.addressof(buffer)
    assert current_signal_stack() == before
