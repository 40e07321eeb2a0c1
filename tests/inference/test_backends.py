"""The runtimes of ``inference.backends``: OpenVINO's thread pinning, observed on the threads themselves.

Each observation runs in a fresh process, as each TorchServe worker is one: OpenVINO's threading is set
up once per process (a pinned model compiled after an unpinned one in the same process is not pinned)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

ov = pytest.importorskip("openvino")

OBSERVE = r"""
import json, os, sys, threading, time
import torch
from inference.backends import OpenVINOBackend, load_backend
graph, pinning = sys.argv[1], json.loads(sys.argv[2])
backend = load_backend(graph, threads=1) if pinning is None else OpenVINOBackend(graph, threads=1, pinning=pinning)
stop = threading.Event()

def loop():
    while not stop.is_set():
        backend(torch.zeros(4, 16, 64, 64))

runner = threading.Thread(target=loop)
runner.start()
seen, end = set(), time.monotonic() + 1.0
while time.monotonic() < end:
    for tid in os.listdir("/proc/self/task"):
        try:
            seen.add(tuple(sorted(os.sched_getaffinity(int(tid)))))
        except OSError:
            pass
stop.set()
runner.join()
print(json.dumps({"pinned": backend.compiled.get_property("ENABLE_CPU_PINNING"), "providers": backend.providers,
                  "masks": sorted(seen), "process": sorted(os.sched_getaffinity(0))}))
"""


@pytest.fixture(scope="module")
def conv_graph(tmp_path_factory):
    """An OpenVINO IR that takes a few ms per call, long enough for its threads to be seen at work."""
    net = torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(8)]).eval()
    path = tmp_path_factory.mktemp("ov") / "convs.xml"
    ov.save_model(ov.convert_model(net, example_input=torch.zeros(1, 16, 64, 64)), str(path))
    return str(path)


def observe(graph: str, pinning: bool | None) -> dict:
    """Every CPU set any thread of a fresh process had while the backend ran in a loop (OpenVINO's pinning
    sets a thread's affinity when it enters the inference arena and restores it after). ``None``: defaults."""
    out = subprocess.run([sys.executable, "-c", OBSERVE, graph, json.dumps(pinning)], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_openvino_threads_are_not_pinned_by_default(conv_graph):
    seen = observe(conv_graph, None)
    assert seen["pinned"] is False and seen["providers"] == ["CPU f32"]
    assert seen["masks"] == [seen["process"]]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning is invisible with one CPU")
def test_pinning_on_request_narrows_the_threads_affinity(conv_graph):
    """The control of the test above: what it sees where OpenVINO pins (its own default)."""
    seen = observe(conv_graph, True)
    assert seen["pinned"] is True and seen["providers"] == ["CPU f32 pinned"]
    assert any(len(mask) < len(seen["process"]) for mask in seen["masks"])


def test_the_runtime_is_the_graph_files_and_a_new_one_is_one_registry_entry(monkeypatch, tmp_path):
    from inference import backends
    from inference.backends import RUNTIMES, load_backend, runtime_for

    assert {cls.name for cls in RUNTIMES.values()} == set(RUNTIMES)
    extensions = [e for cls in RUNTIMES.values() for e in cls.extensions]
    assert len(extensions) == len(set(extensions))  # one runtime per extension
    assert [runtime_for(f"x/model{e}").name for e in (".pt", ".onnx", ".xml", ".ONNX")] == \
        ["torchscript", "onnxruntime", "openvino", "onnxruntime"]
    with pytest.raises(ValueError, match=r"no backend for 'm.tflite': expected .pt/.ts/.torchscript \(torchscript\), "
                                         r".onnx \(onnxruntime\), .xml \(openvino\)"):
        runtime_for("m.tflite")
    with pytest.raises(TypeError, match=r"unknown options \['precison'\]"):  # a typo is not silently dropped
        load_backend("m.onnx", precison="bf16")

    class EchoBackend:  # what another runtime brings: the class, its attributes, nothing elsewhere
        name, extensions, options, threads_fixed, packages, companions = "echo", (".echo",), ("scale",), True, (), ()

        def __init__(self, path, *, device, threads, scale=1):
            self.path, self.threads, self.scale = path, threads, scale

        def __call__(self, images):
            return images.float() * self.scale

    monkeypatch.setitem(backends.RUNTIMES, "echo", EchoBackend)
    echo = load_backend(str(tmp_path / "m.echo"), threads=3, scale=2, precision="bf16")  # OpenVINO's: not echo's
    assert (echo.threads, echo.scale) == (3, 2) and echo(torch.ones(1, 3)).tolist() == [[2.0, 2.0, 2.0]]
