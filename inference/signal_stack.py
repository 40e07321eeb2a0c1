"""The calling thread's signal alternate stack, kept valid across OpenVINO's CPU plugin.

OpenVINO's CPU plugin (2026.4, ``src/plugins/intel_cpu/src/sigstack_manager.cpp``) installs a signal
alternate stack of its own on the thread that creates it (so that the kernel grants AMX to the process)
and, when destroyed, puts back the stack it found only if its own is still the current one, then unmaps
its own. Two plugins (one per ``openvino.Core`` that used the CPU) destroyed in the order they were made
leave the thread's alternate stack pointing at unmapped memory: A saves Python's, B saves A's, A is
destroyed (B is current: nothing restored, A unmapped), B is destroyed (A restored: unmapped). The next
signal whose handler runs on the alternate stack (every handler Python installs: SIGINT, SIGTERM, SIGCHLD,
faulthandler's) cannot be delivered, and the kernel kills the process with SIGSEGV, silently (nothing can
run to print a traceback). Measured: CI's test process died so three times, when a subprocess ended after
the OpenVINO tests; ``tests/inference/test_signal_stack.py`` reproduces the sequence.

Two defences, both here: :func:`openvino_core` is the one ``Core`` of the process (one plugin, never
destroyed before exit; OpenVINO recommends one ``Core`` per application anyway), and
:func:`keep_signal_stack` wraps code that makes ``Core`` objects of its own (NNCF's engines): it puts back
the alternate stack that was current before, so a plugin destroyed later finds its stack not current and
restores nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys


class _StackT(ctypes.Structure):
    """``stack_t`` of <signal.h> (Linux)."""
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
    return libc


def _read(libc) -> _StackT:
    stack = _StackT()
    if libc.sigaltstack(None, ctypes.byref(stack)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack")
    return stack


def current_signal_stack() -> tuple[int | None, int, int] | None:
    """The calling thread's alternate signal stack as ``(address, flags, size)``; None off Linux."""
    libc = _libc()
    if libc is None:
        return None
    stack = _read(libc)
    return stack.ss_sp, stack.ss_flags, stack.ss_size


def unmapped_signal_stack() -> tuple[int, int] | None:
    """The calling thread's alternate signal stack as ``(address, size)`` when it points at memory that is not
    mapped (what a plugin destroyed in the wrong order leaves); None when it is mapped, absent, or off Linux."""
    stack = current_signal_stack()
    if stack is None or not stack[0]:
        return None
    address, _, size = stack
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            if start <= address and address + size <= end:
                return None
    return address, size


@contextlib.contextmanager
def keep_signal_stack():
    """Run the block, then put back the calling thread's alternate signal stack as it was before."""
    libc = _libc()
    if libc is None:
        yield
        return
    saved = current_signal_stack()
    try:
        yield
    finally:
        set_signal_stack(saved)


def set_signal_stack(stack: tuple[int | None, int, int]) -> bool:
    """Make ``stack`` (as :func:`current_signal_stack` returns it) the calling thread's alternate signal
    stack; False where the kernel refuses it (e.g. too small for AMX's state once AMX is granted)."""
    libc = _libc()
    address, flags, size = stack
    wanted = _StackT(address, flags & ~1, size)  # SS_ONSTACK is reported, never set
    return libc is not None and libc.sigaltstack(ctypes.byref(wanted), None) == 0


@functools.cache
def openvino_core():
    """The process's one ``openvino.Core`` (see the module docstring: a second one, destroyed in the
    wrong order, breaks signal delivery)."""
    import openvino as ov

    core = ov.Core()
    # Creates the CPU plugin now, on this thread: its alternate stack (large enough for AMX's state) stays
    # installed for the life of the process.
    core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return core
