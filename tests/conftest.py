"""Shared fixtures: a generated ImageFolder tree, a small checkpoint and its exports."""
from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
import threading
from pathlib import Path

# The test process is a gRPC client (tests/integration/test_protocols.py, ...) and later forks DataLoader
# workers (tests/training/). With gRPC core's fork support on (its default), a fork after gRPC calls hangs or
# crashes now and then: CI died with SIGSEGV in tests/training/test_bad_images.py (2026-12-02), and a loop of
# gRPC calls + a 1-worker DataLoader hung in 5 of 5 runs of 100 forks here, 0 of 10 runs with this set
# (grpc/grpc#32992). Set before anything imports grpc; tests/test_grpc_fork.py guards it.
GRPC_IMPORTED_FIRST = "grpc" in sys.modules  # a plugin imported it before this file: the setting came too late
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.checkpoint import ModelSpec, save_checkpoint  # noqa: E402

TINY_KWARGS = {"widths": [8, 8, 16, 16], "head_width": 32}
CLASSES = ["circle", "horizontal", "vertical"]


def pattern_image(kind: str, size: int = 20, seed: int = 0) -> np.ndarray:
    """A small RGB picture whose class is visible: a disc, horizontal or vertical stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    phase = rng.integers(0, 4)
    if kind == "circle":
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
    elif kind == "horizontal":
        mask = ((yy + phase) // 3) % 2 == 0
    else:
        mask = ((xx + phase) // 3) % 2 == 0
    color = rng.integers(120, 256, 3)
    img = np.where(mask[..., None], color, rng.integers(0, 60, 3)).astype(np.uint8)
    noise = rng.integers(0, 20, img.shape, dtype=np.uint8)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


@contextlib.contextmanager
def json_server(answer, *, headers: list | None = None, bodies: list | None = None,
                content_type: str = "application/json"):
    """A loopback HTTP server answering every POST with ``answer(request body bytes)`` as JSON (200; bytes are sent
    as they are, as ``content_type``); yields its base URL. Stands in for a service a test must not reach (OSV) or
    for a misbehaving one. ``headers``, ``bodies``: lists that get each request's headers (a dict) and body."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            if headers is not None:
                headers.append(dict(self.headers))
            request = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if bodies is not None:
                bodies.append(request)
            body = answer(request)
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def lock_held_elsewhere(folder, name: str):
    """Another Python process holding ``inference.folder_lock``'s lock ``folder/name`` (yielded once it holds it);
    killed at the end as kill -9 would kill it: no clean-up runs, the kernel drops the lock."""
    import subprocess
    import textwrap
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from inference.folder_lock import lock_folder
        lock_folder({str(folder)!r}, name={name!r})
        print("held", flush=True)
        time.sleep(60)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_and_check_the_signal_stack():
    """After each module: collect garbage, then check the main thread's alternate signal stack.

    Objects with native finalizers (tritonclient's gevent HTTP client, gRPC channels, ONNX Runtime and OpenVINO
    graphs) that end up in a reference cycle (a ``pytest.raises`` traceback holds its test's frame) are finalized
    wherever the cyclic collector next runs: in any thread, in the middle of a later test. Collected here, in
    the main thread, between modules.

    An ``openvino.Core`` of a test's own, destroyed in the wrong order, leaves the thread's alternate signal
    stack unmapped (see inference.signal_stack); the next signal handled on it (faulthandler's SIGSEGV, Python's
    SIGINT, the DataLoader's SIGCHLD) kills the test process without a word. CI died so in unrelated later tests
    (tests/test_grpc_fork.py, tests/tools/test_prod_profile.py) after tests/export/test_export.py made a Core per
    graph. Such a module fails here, by name, and the stack it began with is put back so that the run goes on."""
    from inference.signal_stack import current_signal_stack, set_signal_stack, unmapped_signal_stack

    before = current_signal_stack()
    yield
    gc.collect()
    broken = unmapped_signal_stack()
    if broken is not None:
        set_signal_stack(before)
        pytest.fail(f"this module left the main thread's signal stack unmapped ({broken[0]:#x}, {broken[1]} bytes): "
                    "use inference.signal_stack.openvino_core() instead of a Core of its own", pytrace=False)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """``root/{train,test}/<class>/*.png``: 3 classes, 24 train and 30 test images each."""
    root = tmp_path_factory.mktemp("shapes")
    for split, n, offset in (("train", 24, 0), ("test", 30, 1000)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i:03d}.png").write_bytes(encode(pattern_image(c, seed=offset + i * 7 + len(c))))
    return root


@pytest.fixture(scope="session")
def checkpoint(image_folder, tmp_path_factory) -> Path:
    """A small cbam_resnet (24 px input, resize 26) trained for a few seconds on the pattern images."""
    from training.engine import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt")
    train(TrainConfig(data=str(image_folder), out=str(out), model_kwargs=TINY_KWARGS, epochs=16, batch_size=16,
                      input_size=24, resize_size=26, lr=3e-3, progress=False))
    return out / "best.pt"


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised small cbam_resnet with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    spec = ModelSpec(arch="cbam_resnet", class_names=CLASSES, input_size=24, resize_size=26,
                     mean=(0.4, 0.45, 0.5), std=(0.25, 0.2, 0.22), model_kwargs=TINY_KWARGS)
    model = spec.build().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("random_ckpt") / "best.pt"
    save_checkpoint(path, spec, model, metrics={"test_top1": 0.0})
    return path


@pytest.fixture(scope="session")
def export_dir(checkpoint, image_folder, tmp_path_factory) -> Path:
    """Every variant of the trained checkpoint, verified on the test images (calibrated on train/).

    INT8's agreement gate is 98% here, not the default 99%: on 90 test images 99% allows no changed
    answer at all, and the accuracy control judges on the few validation images of this tiny set (10% of 72), which
    cannot see one in 90 (on an AMX Xeon the OpenVINO INT8 graph changed 1 of the 90, 98.9%)."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("export")
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--formats", "all",
                 "--data", str(image_folder / "test"), "--graph-topk", "2", "--min-agreement", "0.98"]) == 0
    return out


@pytest.fixture(scope="session")
def export_manifest(export_dir) -> dict:
    return json.loads((export_dir / "export.json").read_text())
