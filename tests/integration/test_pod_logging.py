"""The pod's TorchServe configuration (deploy/kubernetes/base: config.properties + log4j2.xml) on a real
TorchServe, listeners moved to loopback ports: every log line goes to standard output and no file is
written (TorchServe's own log4j2.xml keeps daily rolling files forever, which would fill the pod's /tmp
emptyDir), while requests are answered and the Prometheus metrics behind the HPA are still served."""
from __future__ import annotations

import pytest

from export.archive import build_archive
from tests.conftest import encode, pattern_image
from tools import REPO
from tools.client import call, predict
from tools.torchserve import TorchServe

pytestmark = pytest.mark.slow

POD = REPO / "deploy" / "kubernetes" / "base"


def test_the_pod_logs_to_stdout_only_and_keeps_its_metrics(export_dir, tmp_path):
    store = tmp_path / "store"
    build_archive(export_dir, variant="onnx", name="shapes", model_store=store, topk=2, tta="none")
    log_dir = tmp_path / "logs"  # the pod's LOG_LOCATION / METRICS_LOCATION
    # the pod's config with its 0.0.0.0 listeners on loopback (TorchServe() gives each its own free port)
    config = tmp_path / "config.properties"
    config.write_text((POD / "config.properties").read_text().replace("http://0.0.0.0:", "http://127.0.0.1:"))
    ts = TorchServe(model_store=store, models="shapes=shapes.mar", config=config, logging=POD / "log4j2.xml",
                    log_dir=str(log_dir), overrides={"metrics_config": str(REPO / "metrics.yaml")})
    ts.start(timeout=180)
    try:
        status, body = predict(ts.url, "shapes", encode(pattern_image("circle", size=40, seed=3)))
        assert status == 200 and body["predictions"][0]["class"], body
        status, metrics = call(f"http://127.0.0.1:{ts.ports[2]}/metrics", timeout=10)  # metrics_address
        assert status == 200 and "ts_inference_requests_total" in metrics  # what the request-rate HPA reads
    finally:
        ts.stop()
    stdout = (ts.workdir / "stdout.log").read_text(errors="replace")
    ts.close()  # its temporary folder: read, no longer needed
    written = sorted(str(p.relative_to(log_dir)) for p in log_dir.rglob("*") if p.is_file())
    print(f"\nfiles under LOG_LOCATION: {written}; stdout: {len(stdout.splitlines())} lines")
    assert written == [], written
    assert '"POST /predictions/shapes HTTP/1.1" 200' in stdout  # the access log, on stdout
    assert "org.pytorch.serve" in stdout and "MODEL_LOG" in stdout  # the frontend's and the worker's lines
