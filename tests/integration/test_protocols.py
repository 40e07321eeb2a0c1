"""Every protocol against a real TorchServe, with clients nobody here wrote: tritonclient (Open Inference
Protocol over HTTP, JSON and binary tensors), requests (KServe v1), grpcio stubs compiled from
TorchServe's own protos (inference.proto ``Predictions``, open_inference_grpc.proto ``ModelInfer``)."""
import base64
import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import empty_pb2
from tritonclient.utils import InferenceServerException

from tests.conftest import encode, pattern_image
from tools import grpc_stubs
from tools.client import predict
from tools.locust import locust_command, run_locust, summary

pytestmark = pytest.mark.slow

IMAGES = [encode(pattern_image("circle", size=30, seed=11)), encode(pattern_image("vertical", size=36, seed=12),
                                                                     "JPEG", quality=90)]
B64 = [base64.b64encode(d).decode() for d in IMAGES]


@pytest.fixture(scope="module")
def native(server):
    """What TorchServe's own /predictions route answers for each image, top-2: the reference."""
    out = []
    for data, ctype in zip(IMAGES, ("image/png", "image/jpeg")):
        status, body = predict(server.url, "shapes", data, content_type=ctype, topk=2)
        assert status == 200, body
        out.append(body)
    return out


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return grpc_stubs.compile_stubs(tmp_path_factory.mktemp("stubs"))


def _host(server):
    return server.url.removeprefix("http://")


def test_tritonclient_http_health_and_two_base64_images(server, native):
    with triton_http.InferenceServerClient(url=_host(server)) as client:
        assert client.is_server_live() and client.is_server_ready()
        image = triton_http.InferInput("image", [2], "BYTES")
        image.set_data_from_numpy(np.array(B64, dtype=object), binary_data=False)
        outputs = [triton_http.InferRequestedOutput(n, binary_data=False) for n in ("labels", "scores", "indices")]
        result = client.infer("shapes", [image], outputs=outputs, request_id="req-7", parameters={"topk": 2})
        labels, scores, indices = (result.as_numpy(n) for n in ("labels", "scores", "indices"))
        assert labels.shape == scores.shape == indices.shape == (2, 2)
        assert scores.dtype == np.float32 and indices.dtype == np.int64
        assert result.get_response()["id"] == "req-7"
        for i, ref in enumerate(native):
            assert [p["index"] for p in ref["predictions"]] == indices[i].tolist()
            assert [p["class"] for p in ref["predictions"]] == [x.decode() if isinstance(x, bytes) else x for x in labels[i]]
            assert scores[i].tolist() == pytest.approx([p["confidence"] for p in ref["predictions"]], abs=1e-6)


def test_tritonclient_http_binary_tensors_carry_the_raw_image_bytes(server, native):
    with triton_http.InferenceServerClient(url=_host(server)) as client:
        image = triton_http.InferInput("image", [2], "BYTES")
        image.set_data_from_numpy(np.array(IMAGES, dtype=object), binary_data=True)
        result = client.infer("shapes", [image], outputs=[triton_http.InferRequestedOutput("indices", binary_data=False)])
        assert result.as_numpy("indices")[:, 0].tolist() == [ref["predictions"][0]["index"] for ref in native]
        assert [o["name"] for o in result.get_response()["outputs"]] == ["indices"]


def test_tritonclient_http_bad_input_is_a_400_with_the_oip_error(server):
    with triton_http.InferenceServerClient(url=_host(server)) as client:
        wrong = triton_http.InferInput("image", [1], "FP32")
        wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32), binary_data=False)
        with pytest.raises(InferenceServerException, match="datatype must be BYTES") as e:
            client.infer("shapes", [wrong])
        assert e.value.status() == "400"
        # model metadata (GET /v2/models/NAME) is not served by TorchServe 0.12's frontend: README says so
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("shapes")
        assert e.value.status() == "404" and "ResourceNotFoundException" in e.value.message(), e.value.message()


def test_tritonclient_http_classification_compression_and_default_outputs(server, native):
    """What tritonclient sends by default or with its options: class_count (Triton's classification extension,
    once ignored), gzip and deflate bodies (TorchServe 0.12 passes them on compressed: once 400s), outputs asked
    in binary form (its default; answered in JSON until 2026-12-06, now in binary form)."""
    with triton_http.InferenceServerClient(url=_host(server)) as client:
        image = triton_http.InferInput("image", [2], "BYTES")
        image.set_data_from_numpy(np.array(IMAGES, dtype=object), binary_data=True)
        for algorithm in (None, "gzip", "deflate"):
            result = client.infer("shapes", [image], request_compression_algorithm=algorithm,
                                  outputs=[triton_http.InferRequestedOutput("scores", class_count=2),
                                           triton_http.InferRequestedOutput("labels")])
            classes, labels = result.as_numpy("scores"), result.as_numpy("labels")
            assert classes.shape == labels.shape == (2, 2), algorithm
            assert all("data" not in o for o in result.get_response()["outputs"]), algorithm
            for row, ref in zip(classes, native):  # "<score>:<index>:<label>", best first, as Triton writes them
                parts = [(x.decode() if isinstance(x, bytes) else x).split(":", 2) for x in row]
                assert [(int(i), name) for _, i, name in parts] == [(p["index"], p["class"]) for p in ref["predictions"]]
                assert [float(v) for v, _, _ in parts] == pytest.approx([p["confidence"] for p in ref["predictions"]],
                                                                        abs=1e-6)
        result = client.infer("shapes", [image])  # no outputs named: every output (binary: tritonclient asks binary_data_output)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["labels", "scores", "indices"]
        assert all(not isinstance(v, list) for v in result.get_response()["parameters"].values())  # scalars only


def test_binary_outputs_come_back_in_tritons_binary_form_beside_json_requests(server, native):
    """Outputs asked with binary_data (tritonclient's default), or all of them with the request's
    binary_data_output: their bytes follow the JSON header that Inference-Header-Content-Length measures
    (read here by tritonclient, and by hand with numpy); JSON requests of the same batches stay JSON."""
    def binary_call(_):
        with triton_http.InferenceServerClient(url=_host(server)) as client:
            image = triton_http.InferInput("image", [2], "BYTES")
            image.set_data_from_numpy(np.array(IMAGES, dtype=object), binary_data=True)
            return client.infer("shapes", [image], parameters={"topk": 2}, outputs=[
                triton_http.InferRequestedOutput(n) for n in ("labels", "scores", "indices")])

    def json_call(_):
        body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": B64}], "parameters": {"topk": 2}}
        return requests.post(f"{server.url}/v2/models/shapes/infer", json=body, timeout=60)

    with ThreadPoolExecutor(8) as pool:  # interleaved, so that batches mix the two forms
        answers = list(pool.map(lambda i: (binary_call if i % 2 else json_call)(i), range(16)))
    for i, answer in enumerate(answers):
        if i % 2:
            outputs = answer.get_response()["outputs"]
            assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in outputs), outputs
            labels, scores, indices = (answer.as_numpy(n) for n in ("labels", "scores", "indices"))
        else:
            assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
            outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
            labels, scores, indices = (np.array(outputs[n]).reshape(2, 2) for n in ("labels", "scores", "indices"))
        for row, ref in enumerate(native):
            assert indices[row].tolist() == [p["index"] for p in ref["predictions"]], i
            assert [x.decode() if isinstance(x, bytes) else x for x in labels[row]] == [p["class"] for p in ref["predictions"]]
            assert scores[row].tolist() == pytest.approx([p["confidence"] for p in ref["predictions"]], abs=1e-6)

    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": B64}],
            "parameters": {"binary_data_output": True, "topk": 2}, "outputs": [{"name": "scores"}, {"name": "indices"}]}
    raw = requests.post(f"{server.url}/v2/models/shapes/infer", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["Content-Type"] == "application/octet-stream", raw.headers
    n = int(raw.headers["Inference-Header-Content-Length"])
    head = json.loads(raw.content[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [2 * 2 * 4, 2 * 2 * 8] and len(raw.content) == n + sum(sizes)
    scores = np.frombuffer(raw.content[n:n + sizes[0]], dtype="<f4").reshape(2, 2)
    indices = np.frombuffer(raw.content[n + sizes[0]:], dtype="<i8").reshape(2, 2)
    assert indices.tolist() == [[p["index"] for p in ref["predictions"]] for ref in native]
    assert scores.flatten().tolist() == pytest.approx([p["confidence"] for ref in native for p in ref["predictions"]],
                                                      abs=1e-6)
    bad = requests.post(f"{server.url}/v2/models/shapes/infer", timeout=60,
                        json={**body, "parameters": {"binary_data_output": "yes"}})
    assert bad.status_code == 400 and "binary_data_output must be true or false" in bad.json()["error"]


def test_millions_of_tiny_elements_are_a_quick_413_beside_a_good_request(server, native):
    """A 24 KB gzipped OIP request whose 16 MiB of binary data holds 3.3 million one-byte BYTES elements: every
    element was read and decoded before the image count was checked (4.7 s of a worker, its batch waiting).
    Now the count stops the read; the good request of the same moment gets its 200."""
    elements = (b"\x01\x00\x00\x00A") * 3_300_000
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(elements)}}]}).encode()
    body = gzip.compress(head + elements)
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Encoding": "gzip",
               "Content-Type": "application/octet-stream"}
    with ThreadPoolExecutor(2) as pool:
        start = time.perf_counter()
        bad = pool.submit(requests.post, f"{server.url}/v2/models/shapes/infer", data=body, headers=headers,
                          timeout=60)
        good = pool.submit(predict, server.url, "shapes", IMAGES[0], content_type="image/png", topk=2)
        bad = bad.result()
        elapsed = time.perf_counter() - start
    print(f"{len(body)} bytes gzipped, {len(head) + len(elements)} inflated: {bad.status_code} in {elapsed:.2f} s")
    assert bad.status_code == 413 and "images in one request; the limit is" in bad.json()["error"], bad.text
    assert elapsed < 3, elapsed  # 4.7 s of decoding alone before
    assert good.result() == (200, native[0])


def test_a_pretty_printed_json_file_sent_as_bytes_is_read_as_json(server, native):
    """`curl --data-binary @request.json` without a JSON content type: the body starts with a newline or a BOM,
    and was taken for an image ("not an image", in TorchServe's shape)."""
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": B64[:1]}]}, indent=2)
    for raw in (("\n" + body).encode(), "\ufeff".encode() + body.encode()):
        answer = requests.post(f"{server.url}/v2/models/shapes/infer", data=raw, timeout=30,
                               headers={"Content-Type": "application/octet-stream"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][2]["data"][0] == native[0]["predictions"][0]["index"]


def test_kserve_v1_two_instances_are_real_json_objects(server, native):
    r = requests.post(f"{server.url}/v1/models/shapes:predict", timeout=30,
                      json={"instances": [{"data": B64[0]}, {"b64": B64[1]}], "topk": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["predictions"] and len(body["predictions"]) == 2
    assert [p["predictions"] for p in body["predictions"]] == [ref["predictions"] for ref in native]


def test_each_protocol_gets_its_own_4xx_while_a_neighbour_succeeds(server):
    jobs = [("v1", "/v1/models/shapes:predict", {"instances": [{"data": "%%% not base64"}]}),
            ("v2", "/v2/models/shapes/infer", {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                                           "data": B64}]}),
            ("good v2", "/v2/models/shapes/infer", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                                "data": B64[:1]}]}),
            ("good v1", "/v1/models/shapes:predict", {"instances": [B64[1]]})]
    with ThreadPoolExecutor(len(jobs)) as pool:  # sent together: one batch window on this server
        answers = list(pool.map(lambda j: requests.post(server.url + j[1], json=j[2], timeout=30), jobs))
    bad_v1, bad_v2, good_v2, good_v1 = answers
    assert bad_v1.status_code == 400 and bad_v1.json()["error"] == "bad base64" and bad_v1.json()["code"] == 400
    assert bad_v2.status_code == 400 and "shape [3] holds 3 elements but 2" in bad_v2.json()["error"]
    assert list(bad_v2.json()) == ["error"]  # OIP's $inference_error_response over HTTP; gRPC's carries more
    assert good_v2.status_code == 200 and good_v2.json()["outputs"][0]["shape"] == [1, 2]
    assert good_v1.status_code == 200 and len(good_v1.json()["predictions"]) == 1


def test_bodies_that_used_to_fail_their_whole_batch_get_their_own_400(server, native):
    """These raised out of the handler's preprocess (TypeError, RecursionError), and TorchServe answered
    every request of their batch 503: now each is its own 400, and a good neighbour gets its 200."""
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": B64[:1]}
    deep = b'{"data":' + b"[" * 5_000 + b"]" * 5_000 + b"}"  # deeper than Python parses, under the 10,000 values
    jobs = [("/v2/models/shapes/infer", {"json": {"inputs": [{**tensor, "parameters": {"binary_data_size": "9"}}]}}),
            ("/v2/models/shapes/infer", {"json": {"inputs": [tensor], "outputs": [{"name": ["labels"]}]}}),
            ("/predictions/shapes", {"data": deep, "headers": {"Content-Type": "application/json"}}),
            ("/v2/models/shapes/infer", {"json": {"inputs": [tensor]}})]
    with ThreadPoolExecutor(len(jobs)) as pool:  # sent together: one batch window on this server
        answers = list(pool.map(lambda j: requests.post(server.url + j[0], timeout=30, **j[1]), jobs))
    size, outputs, nested, good = answers
    assert size.status_code == 400 and "binary_data_size must be a non-negative integer" in size.json()["error"]
    assert outputs.status_code == 400 and '"outputs" may name' in outputs.json()["error"]
    assert nested.status_code == 400 and "malformed JSON" in nested.json()["detail"]
    assert good.status_code == 200 and good.json()["outputs"][0]["data"][0] == native[0]["predictions"][0]["class"]


def test_multipart_text_fields_are_not_images_and_any_file_field_is(server, native):
    """requests' multipart forms: a text field beside the file is not an image (it was: 'not an image'),
    and a file field named "body" is one of the files (it was taken for a raw body, the others dropped)."""
    url = f"{server.url}/predictions/shapes"
    one = requests.post(url, files={"image": ("a.png", IMAGES[0], "image/png")}, data={"note": "holiday", "topk": "2"},
                        timeout=30)
    assert one.status_code == 200, one.text
    got, ref = one.json()["predictions"], native[0]["predictions"]
    assert [p["index"] for p in got] == [p["index"] for p in ref]
    assert [p["confidence"] for p in got] == pytest.approx([p["confidence"] for p in ref], abs=1e-5)
    two = requests.post(url, files={"body": ("a.png", IMAGES[0], "image/png"), "other": ("b.jpg", IMAGES[1])},
                        timeout=30)  # the second part names no content type: application/octet-stream
    assert two.status_code == 200, two.text
    assert [r["predictions"][0]["class"] for r in two.json()] == [n["predictions"][0]["class"] for n in native]


def test_grpc_predictions_with_torchserves_inference_proto(server, stubs, native):
    pb, pb_grpc = grpc_stubs.load(stubs, "inference")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_ports[0]}") as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        assert stub.Ping(empty_pb2.Empty()).health
        reply = stub.Predictions(pb.PredictionsRequest(model_name="shapes", input={"data": IMAGES[0], "topk": b"2"}))
        assert json.loads(reply.prediction)["predictions"] == native[0]["predictions"]
        # a per-request error comes back as gRPC OK with the JSON error (TorchServe 0.12 drops the code)
        reply = stub.Predictions(pb.PredictionsRequest(model_name="shapes", input={"data": b"garbage"}))
        err = json.loads(reply.prediction)
        assert err["error"] == "bad image" and err["code"] == 400 and "not an image" in err["detail"]


def test_grpc_stream_predictions_ends_cleanly_and_the_worker_survives(server, stubs, native):
    """TorchServe 0.12's StreamPredictions needs ts_stream_next=false on the last answer; without it the
    frontend threw a NullPointerException, answered INTERNAL "Worker died." and restarted the worker."""
    pb, pb_grpc = grpc_stubs.load(stubs, "inference")
    log = server.log_dir / "ts_log.log"
    log_start = log.stat().st_size
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_ports[0]}") as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        for _ in range(2):  # a second call reaches the same worker: it did not die
            call = stub.StreamPredictions(pb.PredictionsRequest(model_name="shapes", input={"data": IMAGES[0],
                                                                                       "topk": b"2"}), timeout=30)
            replies = list(call)  # the stream ends: no RpcError
            assert call.code() == grpc.StatusCode.OK
            assert len(replies) == 1 and json.loads(replies[0].prediction)["predictions"] == native[0]["predictions"]
        reply = stub.Predictions(pb.PredictionsRequest(model_name="shapes", input={"data": IMAGES[0], "topk": b"2"}))
        assert json.loads(reply.prediction)["predictions"] == native[0]["predictions"]
    with open(log, "rb") as f:
        f.seek(log_start)
        since = f.read().decode(errors="replace")
    assert "NullPointerException" not in since and "Worker disconnected" not in since, since[-2000:]
    # the header is for gRPC only: on HTTP it would turn the answer into a chunked stream
    http = requests.post(f"{server.url}/predictions/shapes", data=IMAGES[0], headers={"Content-Type": "image/png"},
                         timeout=30)
    assert http.status_code == 200 and "ts_stream_next" not in http.headers
    assert http.headers.get("Transfer-Encoding") != "chunked" and int(http.headers["Content-Length"]) == len(http.content)


def test_oip_grpc_model_infer_with_torchserves_proto(server, stubs, native):
    pb, pb_grpc = grpc_stubs.load(stubs, "open_inference_grpc")
    tensor = pb.ModelInferRequest.InferInputTensor
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_ports[0]}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        request = pb.ModelInferRequest(model_name="shapes", inputs=[tensor(
            name="image", datatype="BYTES", shape=[2], contents=pb.InferTensorContents(bytes_contents=IMAGES))])
        reply = stub.ModelInfer(request)
        out = {o.name: o for o in reply.outputs}
        assert list(out["indices"].shape) == [2, 2]
        assert list(out["indices"].contents.int64_contents) == \
            [p["index"] for ref in native for p in ref["predictions"]]
        # TorchServe writes BYTES outputs JSON-quoted: '"circle"'
        assert [json.loads(b) for b in out["labels"].contents.bytes_contents] == \
            [p["class"] for ref in native for p in ref["predictions"]]
        bad = stub.ModelInfer(pb.ModelInferRequest(model_name="shapes", inputs=[tensor(
            name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"junk"]))]))
        assert [o.name for o in bad.outputs] == ["error"] and b"not an image" in bad.outputs[0].contents.bytes_contents[0]
        # the worker survived the error: the next call is answered
        assert len(stub.ModelInfer(request).outputs) == 3


def test_tritonclient_grpc_does_not_reach_torchserves_oip_service(server):
    """TorchServe 0.12 names its OIP service org.pytorch.serve.grpc.openinference.GRPCInferenceService, not
    KServe's inference.GRPCInferenceService that tritonclient.grpc calls: UNIMPLEMENTED (README says so)."""
    with triton_grpc.InferenceServerClient(url=f"127.0.0.1:{server.grpc_ports[0]}") as client:
        with pytest.raises(InferenceServerException, match="(?i)unimplemented"):
            client.is_server_live()


@pytest.mark.parametrize("schema", ["kserve_v1", "oip_v2"])
def test_locust_speaks_the_protocol_and_checks_the_answers(server, image_folder, tmp_path, schema):
    prefix = tmp_path / schema
    cmd = locust_command(server.url, images=image_folder / "test", model="shapes", users=2, seconds=4, prefix=prefix,
                         schema=schema)
    rc, _ = run_locust(cmd + ["--topk", "2"], log=tmp_path / "locust.log", timeout=120)
    stats = summary(prefix)
    assert stats["requests"] > 5, (tmp_path / "locust.log").read_text()[-2000:]
    assert stats["failures"] == 0 and rc == 0, (tmp_path / "locust.log").read_text()[-2000:]
    # and failures are counted: a top-k beyond the 3 classes is refused (400) in every protocol
    bad = tmp_path / "bad"
    run_locust(locust_command(server.url, images=image_folder / "test", model="shapes", users=1, seconds=2,
                              prefix=bad, schema=schema) + ["--topk", "99"], timeout=120)
    assert summary(bad)["failures"] == summary(bad)["requests"] > 0
