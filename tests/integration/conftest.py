"""One real TorchServe for the integration tests, serving freshly built archives."""
import os
from pathlib import Path

import pytest
import torch

from export.archive import build_archive
from inference.images import decode_rgb
from inference.transforms import EvalPreset, normalize
from inference.tta import predict_proba
from tools.torchserve import TorchServe
from training.checkpoint import load_model

BATCH_DELAY_MS = 300  # long enough that requests sent together land in one batch

SERVED = {"shapes": "onnx", "shapes_ts": "torchscript", "shapes_ov8": "openvino-int8",
          "shapes_tta": "onnx-tta", "shapes_topk": "onnx-topk"}
ADAPTIVE = "shapes_adaptive"  # the onnx graph with adaptive ten-crop TTA in the handler
ADAPTIVE_THRESHOLD = 0.85     # the test model's plain confidences on test_torchserve's images lie on both sides
HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before the other plain hooks: --sw deselects in the order that runs
def pytest_collection_modifyitems(items):
    """The modules that use the shared ``server`` run first among the integration tests, one after the other,
    so that one TorchServe serves them all (a start costs 25-30 s on 2 cores) and is stopped before the other
    modules start servers of their own (the soak, the own-photos flow): never two at once. The rest keep
    their order."""
    group_server_users_first(items, HERE)


@pytest.hookimpl(tryfirst=True)  # before the terminal's: --collect-only lists the order that runs
def pytest_collection_finish(session):
    """The same grouping again once collection is done: pytest's ``--ff``, ``--nf`` and ``--lf`` reorder in
    wrappers of ``pytest_collection_modifyitems``, which always run after its plain hooks (``--ff`` put a failed
    soak test before the shared server's modules, which then idled beside the soak's own server). With
    ``--ff`` the block of integration tests runs where its first test was moved to: failed tests elsewhere that
    sort after it run after the whole block."""
    group_server_users_first(session.items, HERE)


def group_server_users_first(items, here: Path) -> None:
    """Reorders ``items`` in place: the tests in ``here`` as one block where the first of them was, those of
    the modules that use ``server`` first, each group in its order (``--ff`` may have moved a failed one to
    the front: the block follows it there)."""
    block = [item for item in items if item.path.parent == here]
    if not block:
        return
    users = {item.module for item in block if "server" in item.fixturenames}
    members = set(block)
    rest = [item for item in items if item not in members]
    start = items.index(block[0])  # every item before it is one of the rest
    items[:] = (rest[:start] + [x for x in block if x.module in users] + [x for x in block if x.module not in users]
                + rest[start:])


def _start(export_dir, store) -> TorchServe:
    for name, variant in SERVED.items():
        build_archive(export_dir, variant=variant, name=name, model_store=store, batch_size=8,
                      max_batch_delay=BATCH_DELAY_MS, topk=2, tta="flip")
    build_archive(export_dir, variant="onnx", name=ADAPTIVE, model_store=store, batch_size=8,
                  max_batch_delay=BATCH_DELAY_MS, topk=2, tta="ten_crop", adaptive_tta=True,
                  adaptive_threshold=ADAPTIVE_THRESHOLD)
    # Version 2.0 of "shapes" (the TorchScript graph) sits in the store, registered later over HTTP.
    build_archive(export_dir, variant="torchscript", name="shapes", version="2.0", file_name="shapes_v2",
                  model_store=store, topk=2, tta="none")
    ts = TorchServe(model_store=store, models=",".join(f"{n}={n}.mar" for n in [*SERVED, ADAPTIVE]),
                    overrides={"enable_model_api": "true"})
    ts.start(timeout=180)
    return ts


def _close(ts: TorchServe) -> None:
    pid = ts.pid
    ts.close()  # stopped by PID, and its temporary folder removed
    with pytest.raises(ProcessLookupError):  # stopped by PID: the Java process is gone
        os.kill(pid, 0)


@pytest.fixture(scope="session")
def _shared_server():
    """Holds the one shared TorchServe (started by the first module that asks for ``server``); stops it at
    the end of the session if the last module using it did not."""
    held: dict[str, TorchServe] = {}
    yield held
    if "ts" in held:
        _close(held.pop("ts"))


@pytest.fixture(scope="module")
def server(_shared_server, export_dir, tmp_path_factory, request):
    """One real TorchServe serving the archives of :data:`SERVED` (and ADAPTIVE; shapes 2.0 in its store), shared
    by the modules that use it (they run one after the other: :func:`pytest_collection_modifyitems`) and
    stopped by PID after the last of them. A module that changes what it serves puts it back."""
    if "ts" not in _shared_server:
        _shared_server["ts"] = _start(export_dir, tmp_path_factory.mktemp("model_store"))
    yield _shared_server["ts"]
    items = request.session.items
    last = max(i for i, item in enumerate(items) if item.module is request.module)
    if not any("server" in item.fixturenames for item in items[last + 1:]):
        _close(_shared_server.pop("ts"))


@pytest.fixture(scope="module")
def eager(checkpoint):
    spec, model = load_model(checkpoint)
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)

    def probs(payloads, tta="flip"):
        batch = preset.batch([decode_rgb(p, min_side=preset.min_decode_side) for p in payloads])  # as offline
        with torch.no_grad():
            return predict_proba(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), batch, tta)
    return spec, probs


