"""The locked-down profile (config.prod.properties) on a real TorchServe: token authorization on,
registration only from the model store, everything on loopback."""
import json
import urllib.error

import pytest

from export.archive import build_archive
from tests.conftest import encode, pattern_image
from tools import REPO
from tools.client import call
from tools.torchserve import TorchServe, read_properties

pytestmark = pytest.mark.slow


def _call(url, *, method="GET", key=None, data=None, ctype=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if ctype:
        headers["Content-Type"] = ctype
    try:
        return call(url, method=method, data=data, headers=headers)
    except urllib.error.URLError as e:  # not listening yet
        return 0, str(e)


def test_every_listener_is_on_loopback_in_both_profiles():
    for name in ("config.properties", "config.prod.properties"):
        props = read_properties(REPO / name)
        for key in ("inference_address", "management_address", "metrics_address"):
            assert props[key].startswith("http://127.0.0.1:"), (name, key)
    assert "disable_token_authorization" not in read_properties(REPO / "config.prod.properties")


def test_tokens_are_required_and_registration_is_limited_to_the_store(export_dir, tmp_path):
    store = tmp_path / "store"
    build_archive(export_dir, variant="onnx", name="shapes", model_store=store, topk=2)
    build_archive(export_dir, variant="onnx", name="extra", model_store=store, topk=2)
    server = TorchServe(model_store=store, models="shapes=shapes.mar", config=REPO / "config.prod.properties")
    server.wait_ready = lambda timeout=120: None  # readiness is checked below, with the keys
    server.start()
    try:
        import time
        key_file = server.workdir / "key_file.json"
        keys = None
        for _ in range(240):  # TorchServe writes the file at start-up: wait until it is complete
            try:
                keys = json.loads(key_file.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.5)
        assert keys, f"no {key_file}"
        inference_key, management_key = keys["inference"]["key"], keys["management"]["key"]
        image = encode(pattern_image("circle", size=30))
        url = f"{server.url}/predictions/shapes"
        for _ in range(120):  # wait for the worker, with the key
            status, _ = _call(url, method="POST", key=inference_key, data=image, ctype="image/png")
            if status == 200:
                break
            time.sleep(1)
        assert status == 200
        assert _call(url, method="POST", data=image, ctype="image/png")[0] in (400, 401)       # no key
        assert _call(url, method="POST", key="wrong", data=image, ctype="image/png")[0] in (400, 401)
        assert _call(f"{server.management_url}/models")[0] in (400, 401)
        assert _call(f"{server.management_url}/models", key=management_key)[0] == 200
        status, body = _call(f"{server.management_url}/models?url=https://example.com/evil.mar",
                             method="POST", key=management_key)
        assert status >= 400 and "allowed" in body.lower(), body
        status, body = _call(f"{server.management_url}/models?url=extra.mar&initial_workers=1&synchronous=true",
                             method="POST", key=management_key)
        assert status == 200, body
    finally:
        server.stop()
