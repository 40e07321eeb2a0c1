"""The locked-down profile (config.prod.properties) on a real TorchServe, started the way
``make serve CONFIG=config.prod.properties [MODEL_API=1]`` starts it (``python -m scripts.ts_server
serve``) on free loopback ports: ready with the keys, token authorization on every API but /metrics,
the keys in the run folder, registration off by default and, with the option, only from archives in
the store; ``make stop``'s drain counts /v1, /v2, /explanations and gRPC requests, and waits for a
gRPC ModelInfer that TorchServe counts nowhere."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import zipfile
from pathlib import Path

import grpc
import psutil
import pytest

from export.archive import build_archive
from tests.conftest import encode, pattern_image
from tools import REPO, grpc_stubs
from tools.client import call
from tools.drain import drain, inference_arrivals
from tools.locust import locust_command, summary
from tools.torchserve import free_ports, read_properties

pytestmark = pytest.mark.slow

PROD = REPO / "config.prod.properties"
SLOW_DELAY_MS = 3000  # the slow model's batch waits this long for company: its requests stay in flight
IMAGE = encode(pattern_image("circle", size=30))
B64 = base64.b64encode(IMAGE).decode()
V2_BODY = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}]}).encode()
V1_BODY = json.dumps({"instances": [B64]}).encode()


def _call(url, *, method="GET", key=None, data=None, ctype=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if ctype:
        headers["Content-Type"] = ctype
    try:
        return call(url, method=method, data=data, headers=headers, timeout=timeout)
    except urllib.error.URLError as e:  # not listening
        return 0, str(e)


class Served:
    """``python -m scripts.ts_server serve`` (what ``make serve`` runs) with config.prod.properties, its
    listeners moved to free loopback ports, its run folder, logs and state file under ``tmp``."""

    def __init__(self, tmp: Path, store: Path, *options: str):
        props = read_properties(PROD)
        spare = free_ports(5)
        http, grpc_ports = spare[:3], tuple(spare[3:])
        props.update({"inference_address": f"http://127.0.0.1:{http[0]}",
                      "management_address": f"http://127.0.0.1:{http[1]}",
                      "metrics_address": f"http://127.0.0.1:{http[2]}",
                      "grpc_inference_port": str(grpc_ports[0]), "grpc_management_port": str(grpc_ports[1])})
        self.config = tmp / "prod.properties"
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))  # values verbatim
        self.run_dir, self.state_file, self.log = tmp / "run", tmp / "server.json", tmp / "serve.log"
        self.grpc_port = grpc_ports[0]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.ts_server", "serve", "--config", str(self.config),
             "--model-store", str(store), "--run-dir", str(self.run_dir), "--log-dir", str(tmp / "logs"),
             "--state-file", str(self.state_file), *options],
            cwd=REPO, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.state: dict = {}

    def wait_ready(self, timeout: float = 300) -> dict:
        """serve writes its state file once TorchServe is ready (readiness with the keys)."""
        deadline = time.time() + timeout
        while not self.state_file.is_file():
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}: {self.log.read_text()[-4000:]}"
            assert time.time() < deadline, f"not ready after {timeout} s: {self.log.read_text()[-4000:]}"
            time.sleep(0.5)
        time.sleep(0.2)  # written in one go, but be sure it is complete
        self.state = json.loads(self.state_file.read_text())
        return self.state

    def keys(self) -> dict:
        data = json.loads(Path(self.state["key_file"]).read_text())
        return {"inference": data["inference"]["key"], "management": data["management"]["key"],
                "api": data["API"]["key"]}

    def stop_cli(self, drain_timeout: float = 30) -> subprocess.CompletedProcess:
        """``make stop``: ``python -m scripts.ts_server stop`` on this server's state file."""
        return subprocess.run([sys.executable, "-m", "scripts.ts_server", "stop", "--state-file", str(self.state_file),
                               "--drain-timeout", str(drain_timeout)], cwd=REPO, capture_output=True, text=True,
                              timeout=drain_timeout + 60)

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.state.get("pid"):
                try:
                    os.kill(self.state["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return grpc_stubs.compile_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="module")
def prod_store(export_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("prod_store")
    build_archive(export_dir, variant="onnx", name="shapes", model_store=store, topk=2)
    build_archive(export_dir, variant="onnx", name="slow", model_store=store, batch_size=8,
                  max_batch_delay=SLOW_DELAY_MS, workers=1, response_timeout=20, topk=2, tta="none")
    return store


def test_every_listener_is_on_loopback_in_both_profiles():
    for name in ("config.properties", "config.prod.properties"):
        props = read_properties(REPO / name)
        for key in ("inference_address", "management_address", "metrics_address"):
            assert props[key].startswith("http://127.0.0.1:"), (name, key)
        for key in ("grpc_inference_address", "grpc_management_address"):
            assert props[key] == "127.0.0.1", (name, key)
    prod = read_properties(PROD)
    assert "disable_token_authorization" not in prod
    assert prod["enable_model_api"] == "false"  # registration is an explicit option (MODEL_API=1)
    assert prod["allowed_urls"] not in ("", "^$")  # ^$ lets any directory on disk be registered: see below


def test_make_serve_with_the_prod_profile_is_ready_keyed_and_drains_every_route(prod_store, tmp_path, stubs):
    served = Served(tmp_path, prod_store)
    try:
        state = served.wait_ready()
        # the keys are where the README says: TorchServe's working directory, serve's run folder
        key_file = served.run_dir / "key_file.json"
        assert state["key_file"] == str(key_file) and key_file.is_file()
        assert key_file.stat().st_mode & 0o777 == 0o600
        keys = served.keys()
        url, mgmt, metrics = state["url"], state["management_url"], state["metrics_url"]

        assert _call(f"{url}/ping")[0] == 400                                   # no key: InvalidKeyException
        assert _call(f"{url}/ping", key=keys["management"])[0] == 400           # the wrong kind of key
        status, body = _call(f"{url}/ping", key=keys["inference"])
        assert status == 200 and json.loads(body)["status"] == "Healthy"
        pred = f"{url}/predictions/shapes"
        status, body = _call(pred, method="POST", key=keys["inference"], data=IMAGE, ctype="image/png")
        assert status == 200 and json.loads(body)["predictions"], body
        status, body = _call(pred, method="POST", data=IMAGE, ctype="image/png")
        assert status == 400 and "InvalidKeyException" in body
        assert _call(pred, method="POST", key="wrong", data=IMAGE, ctype="image/png")[0] == 400
        # the load test as users run it against this profile: --token sends the inference key
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "circle.png").write_bytes(IMAGE)
        for token, prefix in ((keys["inference"], "keyed"), (None, "keyless")):
            cmd = locust_command(url, images=tmp_path / "photos", model="shapes", users=2, seconds=3,
                                 prefix=tmp_path / prefix, stop_timeout=None, token=token)
            run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
            assert Path(f"{tmp_path / prefix}_stats.csv").is_file(), (run.returncode, run.stdout[-3000:], run.stderr[-3000:])
            load = summary(tmp_path / prefix)
            assert load["requests"] > 0 and load["failures"] == (0 if token else load["requests"]), (prefix, load)
        assert _call(f"{mgmt}/models")[0] == 400
        assert _call(f"{mgmt}/models", key=keys["inference"])[0] == 400
        status, body = _call(f"{mgmt}/models", key=keys["management"])
        assert status == 200 and sorted(m["modelName"] for m in json.loads(body)["models"]) == ["shapes", "slow"]
        assert _call(f"{metrics}/metrics")[0] == 200                           # no key: what the drain reads
        # registration is off in the profile: 405 even with the management key
        assert _call(f"{mgmt}/models?url=shapes.mar&model_name=again", method="POST", key=keys["management"])[0] == 405

        pb, pb_grpc = grpc_stubs.load(stubs, "inference")
        with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
            stub = pb_grpc.InferenceAPIsServiceStub(channel)
            with pytest.raises(grpc.RpcError) as denied:
                stub.Predictions(pb.PredictionsRequest(model_name="shapes", input={"data": IMAGE}))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            metadata = [("authorization", f"Bearer {keys['inference']}")]

            # after each route, the drain that `make stop` runs finds nothing outstanding
            routes = {
                "/v2 infer": lambda: _call(f"{url}/v2/models/shapes/infer", method="POST", key=keys["inference"],
                                           data=V2_BODY, ctype="application/json"),
                "/v1 predict": lambda: _call(f"{url}/v1/models/shapes:predict", method="POST",
                                             key=keys["inference"], data=V1_BODY, ctype="application/json"),
                "/v1 explain": lambda: _call(f"{url}/v1/models/shapes:explain", method="POST",
                                             key=keys["inference"], data=V1_BODY, ctype="application/json"),
                "/explanations": lambda: _call(f"{url}/explanations/shapes", method="POST", key=keys["inference"],
                                               data=IMAGE, ctype="image/png"),
                "gRPC Predictions": lambda: (200, stub.Predictions(
                    pb.PredictionsRequest(model_name="shapes", input={"data": IMAGE}), metadata=metadata).prediction),
            }
            for route, send in routes.items():
                before = inference_arrivals(metrics)["shapes"]
                status, body = send()
                assert status in (200, 503), (route, status, body)  # 503: the handler has no explanations
                assert inference_arrivals(metrics)["shapes"] == before + 1, route  # TorchServe counted it
                result = drain(metrics, state["access_log"], offset=state["access_log_offset"], timeout=10)
                assert result["drained"], (route, result)
            status, body = routes["/v2 infer"]()
            assert status == 200 and json.loads(body)["outputs"], body
            assert json.loads(stub.Predictions(pb.PredictionsRequest(model_name="shapes", input={"data": IMAGE}),
                                               metadata=metadata).prediction)["predictions"]

            # a gRPC ModelInfer alone in flight on the slow model: TorchServe counts it nowhere, so only
            # the workers' log shows it; the drain waits for its answer (without ts_log it would not)
            opb, opb_grpc = grpc_stubs.load(stubs, "open_inference_grpc")
            oip = opb_grpc.GRPCInferenceServiceStub(channel)
            tensor = opb.ModelInferRequest.InferInputTensor
            infer = opb.ModelInferRequest(model_name="slow", inputs=[tensor(
                name="image", datatype="BYTES", shape=[1], contents=opb.InferTensorContents(bytes_contents=[IMAGE]))])
            oip_answer: dict[str, object] = {}
            access_log = Path(state["access_log"])

            def model_infer_answers() -> int:
                return access_log.read_text().count('GRPCInferenceService/ModelInfer HTTP/2.0" 0 ')

            def model_infer():
                reply = oip.ModelInfer(infer, metadata=metadata, timeout=60)
                oip_answer["outputs"] = [o.name for o in reply.outputs]
            counted, answered = inference_arrivals(metrics), model_infer_answers()
            sender = threading.Thread(target=model_infer, daemon=True)
            sender.start()
            time.sleep(1.0)  # in the slow model's batch window (3 s)
            assert inference_arrivals(metrics) == counted  # not counted: the gap
            assert drain(metrics, state["access_log"], offset=state["access_log_offset"], timeout=10)["seconds"] < 1
            result = drain(metrics, state["access_log"], offset=state["access_log_offset"], ts_log=state["ts_log"],
                           ts_log_offset=state["ts_log_offset"], timeout=30)
            assert model_infer_answers() == answered + 1, result  # answered by the time the drain ended
            sender.join(timeout=30)
            assert result["drained"] and result["seconds"] >= 1.0, result  # it waited for the batch window
            assert [w for w in result["busy_workers"] if w.endswith("-slow_1.0")], result
            assert oip_answer["outputs"] == ["labels", "scores", "indices"], oip_answer

            # a gRPC call whose deadline passes in the slow model's batch window: TorchServe counted it, its
            # cancel handler closes it CANCELLED on a gRPC thread, and the job's answer is never logged. That
            # gap held every later drain of the server for its whole timeout ("not drained: 1 of 1")
            before = inference_arrivals(metrics).get("slow", 0)  # ModelInfer above counted none
            with pytest.raises(grpc.RpcError) as late:
                stub.Predictions(pb.PredictionsRequest(model_name="slow", input={"data": IMAGE}), metadata=metadata,
                                 timeout=0.5)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert inference_arrivals(metrics)["slow"] == before + 1  # counted
            result = drain(metrics, state["access_log"], offset=state["access_log_offset"], ts_log=state["ts_log"],
                           ts_log_offset=state["ts_log_offset"], timeout=30)
            assert result["drained"] and result["in_flight"] == 0 and not result["reason"], result
            assert '"gRPC org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions HTTP/2.0" 1 ' in \
                access_log.read_text()
            result = drain(metrics, state["access_log"], offset=state["access_log_offset"], timeout=5)
            assert result["drained"] and result["seconds"] < 2, result  # and later drains are not held

            # make stop with a /v2 and a gRPC request in flight on the slow model: both answered, then stopped
            answers: dict[str, object] = {}

            def v2():
                answers["v2"] = _call(f"{url}/v2/models/slow/infer", method="POST", key=keys["inference"],
                                      data=V2_BODY, ctype="application/json")

            def over_grpc():
                try:
                    answers["grpc"] = json.loads(stub.Predictions(
                        pb.PredictionsRequest(model_name="slow", input={"data": IMAGE}), metadata=metadata,
                        timeout=60).prediction)
                except grpc.RpcError as e:
                    answers["grpc"] = e.code()
            threads = [threading.Thread(target=f, daemon=True) for f in (v2, over_grpc)]
            for t in threads:
                t.start()
            deadline = time.time() + 30
            while (inference_arrivals(metrics) or {}).get("slow", 0) < 2:
                assert time.time() < deadline, "the two requests never reached TorchServe"
                time.sleep(0.02)
            cli = served.stop_cli()
            for t in threads:
                t.join(timeout=60)
        print(f"\nPROD stop: {cli.stdout.strip()!r}; answers {answers}")
        assert cli.returncode == 0 and "drained: 2 requests in flight answered" in cli.stdout, cli.stdout + cli.stderr
        assert "SIGTERM" in cli.stdout
        assert answers["v2"][0] == 200 and json.loads(answers["v2"][1])["outputs"], answers
        assert isinstance(answers["grpc"], dict) and answers["grpc"]["predictions"], answers
        assert served.proc.wait(timeout=60) == 0
        assert not key_file.exists() and not served.state_file.exists()  # the void keys are gone
    finally:
        served.close()


def test_model_api_option_registers_only_archives_in_the_store(prod_store, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(prod_store / "shapes.mar", store)
    with zipfile.ZipFile(prod_store / "shapes.mar") as z:  # an unpacked archive: a model folder
        z.extractall(store / "folder")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(prod_store / "shapes.mar", outside / "elsewhere.mar")
    with zipfile.ZipFile(prod_store / "shapes.mar") as z:
        z.extractall(outside / "model_folder")
    served = Served(tmp_path, store, "--enable-model-api")
    try:
        state = served.wait_ready()
        key = served.keys()["management"]
        mgmt = state["management_url"]

        def register(url, name):
            return _call(f"{mgmt}/models?url={urllib.parse.quote(url, safe='')}&model_name={name}"
                         f"&initial_workers=1&synchronous=true", method="POST", key=key, timeout=180)
        # load_models=all loaded the archive, not the folder beside it in the store
        status, body = _call(f"{mgmt}/models", key=key)
        assert status == 200 and [m["modelName"] for m in json.loads(body)["models"]] == ["shapes"], body
        refused = {
            "https://example.com/evil.mar": "does not match any allowed url",
            f"file://{outside}/elsewhere.mar": "does not match any allowed url",
            f"{outside}/elsewhere.mar": "failed to download",          # an archive outside the store
            f"{outside}/model_folder": "failed to download",           # a folder outside the store
            f"{outside}/model_folder/": "already exists",              # (its file name is empty: the store)
            "folder": "already exists",                                 # a folder inside the store
            f"{store}/folder": "already exists",
            f"{store}/shapes.mar": "already exists",                    # by path, even inside the store
            "sub/shapes.mar": "already exists",
            "elsewhere.mar": "model not found",                         # not in the store
            f"jar:file:{outside}/elsewhere.mar!/": "already exists",
            "ftp://127.0.0.1:1/": "already exists",
            "ftp://127.0.0.1:1/elsewhere.mar": "model not found",      # never fetched: looked up in the store
        }
        answers = {url: register(url, f"m{i}") for i, url in enumerate(refused)}
        print("\nPROD registration: " + "; ".join(f"{u} -> {s} {json.loads(b).get('message', b)[:70]!r}"
                                                  for u, (s, b) in answers.items()))
        for url, (status, body) in answers.items():
            assert status >= 400 and refused[url] in body.lower(), (url, status, body)
        status, body = _call(f"{mgmt}/models", key=key)
        assert [m["modelName"] for m in json.loads(body)["models"]] == ["shapes"], body  # nothing half-registered

        shutil.copy(prod_store / "shapes.mar", store / "extra.mar")  # an archive put into the store: registers
        status, body = register("extra.mar", "extra")
        assert status == 200, body
        inference = served.keys()["inference"]
        status, body = _call(f"{state['url']}/predictions/extra", method="POST", key=inference, data=IMAGE,
                             ctype="image/png")
        assert status == 200 and json.loads(body)["predictions"], body
        assert "drained" in served.stop_cli().stdout
        assert served.proc.wait(timeout=60) == 0
    finally:
        served.close()


def test_serve_stops_on_its_own_sigterm_and_fails_when_torchserve_dies_under_it(prod_store, tmp_path):
    """SIGTERM to ``make serve`` itself (``kill``, ``timeout``, a supervisor's stop) drains and stops the server and
    exits 0 in seconds (it hung for good: the handler stopped the server inside an interrupted ``Popen.wait``).
    TorchServe killed under it (the OOM killer, ``kill -9``) is a failure a supervisor can see: exit 1, said."""
    runs = {}
    for name in ("sigterm", "killed"):
        (tmp_path / name).mkdir()
        served = Served(tmp_path / name, prod_store)
        try:
            state = served.wait_ready()
            start = time.time()
            if name == "sigterm":
                served.proc.send_signal(signal.SIGTERM)
            else:
                os.kill(state["pid"], signal.SIGKILL)
            rc = served.proc.wait(timeout=90)
            runs[name] = (rc, round(time.time() - start, 1), served.log.read_text()[-400:])
            assert not served.state_file.exists()
            gone = not psutil.pid_exists(state["pid"]) or psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE
        finally:
            served.close()
        assert gone, f"TorchServe PID {state['pid']} still runs after {name}"
    print(f"\nSERVE on SIGTERM / TorchServe killed: {runs}")
    assert runs["sigterm"][0] == 0 and runs["sigterm"][1] < 45, runs["sigterm"]
    assert runs["killed"][0] == 1 and "exited without `make stop`" in runs["killed"][2], runs["killed"]


def test_make_stop_while_make_serve_is_still_starting_stops_it(prod_store, tmp_path):
    """The state file says "ready" (README's readiness loops wait for it), so a stop during start-up found
    nothing to stop and the server came up after it: `serve` leaves its PID in a starting file meanwhile, and
    `stop` ends it; no TorchServe is left, and a second `serve` during that start-up is refused."""
    served = Served(tmp_path, prod_store)
    starting = tmp_path / "server.starting.json"
    try:
        deadline = time.time() + 60
        while not starting.is_file():
            assert time.time() < deadline and served.proc.poll() is None, served.log.read_text()[-2000:]
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "scripts.ts_server", "serve", "--config", str(served.config),
                                 "--model-store", str(prod_store), "--run-dir", str(served.run_dir), "--log-dir",
                                 str(tmp_path / "logs2"), "--state-file", str(served.state_file)], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        cli = served.stop_cli()
        rc = served.proc.wait(timeout=90)
        print(f"\nSTOP while starting: {cli.stdout.strip()!r}; serve rc {rc}; second serve: {second.stderr.strip()!r}")
        assert second.returncode == 2 and "is starting TorchServe" in second.stderr, second.stderr
        assert "was still starting: stopped" in cli.stdout, cli.stdout + cli.stderr
        assert rc == 0 and not served.state_file.exists() and not starting.exists()
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(served.run_dir) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"TorchServe processes left: {left}"
    finally:
        served.close()
