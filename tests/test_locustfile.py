"""locustfile.py as users run it: real locust processes against small loopback servers. Every request
that did not get a good answer counts as a failure (no answer at all, a malformed body), and a bad
setting stops locust at start-up with one line. (Locust monkey-patches the interpreter with gevent, so
it runs in its own process, as it does for users.)"""
import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, encode, json_server, pattern_image
from tools.locust import locust_command, summary

pytestmark = pytest.mark.slow

GOOD = {"predictions": [{"class": "circle", "index": 0, "confidence": 0.75}]}
MALFORMED = [  # each once made the check raise, and locust then recorded the request nowhere
    {"predictions": ["x"]},
    {"predictions": [{"class": "circle", "index": 0, "confidence": None}]},
    {"predictions": [{"class": "circle", "index": 0, "confidence": "abc"}]},
]


class Answers:
    """The bodies the stand-in server answers in turn, and how many it has answered."""
    bodies: list = []
    served = 0

    @classmethod
    def next(cls, _request: bytes) -> dict:
        cls.served += 1
        return cls.bodies[(cls.served - 1) % len(cls.bodies)]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(encode(pattern_image("circle", size=20, seed=i)))
    return folder


def _locust(host, images, prefix, *extra, seconds=3, token=None):
    cmd = locust_command(host, images=images, model="m", users=2, seconds=seconds, prefix=prefix,
                         stop_timeout=None, token=token) + list(extra)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_host_where_nothing_listens_stops_a_headless_run_in_one_line(images, tmp_path):
    """make loadtest before make serve spent its whole duration on refused connections and wrote a report of 100%
    failures; a server that stops answering during a run is still counted as failures (below)."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _locust(f"http://127.0.0.1:{port}", images, tmp_path / "closed")
    assert proc.returncode == 1
    assert f"error: nothing answers at http://127.0.0.1:{port} (" in proc.stderr and "make serve & make wait" in \
        proc.stderr


@pytest.mark.parametrize("bodies,failing", [([GOOD], False), (MALFORMED, True)], ids=["good", "malformed"])
def test_every_answer_is_checked_and_counted(images, tmp_path, bodies, failing):
    Answers.bodies, Answers.served = bodies, 0
    with json_server(Answers.next) as url:
        _locust(url, images, tmp_path / "p")
    s = summary(tmp_path / "p")
    # the answered requests are in the statistics (those of malformed bodies were in none before): all of them
    # but those the stop cut (2 users), from the figures written as locust quits; the CSV's last row lags them
    assert s["source"] == "p_final.json" and Answers.served - 2 <= s["requests"] <= Answers.served, (s, Answers.served)
    assert s["failures"] == (s["requests"] if failing else 0), s
    (tmp_path / "p_final.json").unlink()
    snapshot = summary(tmp_path / "p")
    assert snapshot["source"] == "p_stats.csv" and snapshot["requests"] <= s["requests"]


@pytest.mark.parametrize("extra,message", [
    (["--schema", "kserve"], "invalid choice: 'kserve'"),
    (["--topk", "abc"], "error: --topk (TOPK) must be an integer >= 1, not 'abc'"),
    (["--max-images", "0"], "error: --max-images (MAX_IMAGES) must be an integer >= 1, not '0'"),
])
def test_a_bad_setting_stops_locust_at_start_up(images, tmp_path, extra, message):
    proc = _locust("http://127.0.0.1:9", images, tmp_path / "bad", *extra, seconds=30)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    stats = tmp_path / "bad_stats.csv"
    assert not stats.exists() or "Aggregated" not in stats.read_text()  # no request was sent


def test_schema_from_the_environment_is_checked_too(images, tmp_path):
    """argparse never checks a default (here SCHEMA's) against the choices: the locustfile does."""
    import os
    import sys
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "locustfile.py"), "--headless", "-u", "1", "-r", "1",
           "-t", "30s", "--host", "http://127.0.0.1:9", "--images", str(images)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SCHEMA": "kserve"})
    assert proc.returncode != 0 and "error: --schema (SCHEMA) 'kserve' is not one of ours, stock" in proc.stderr, \
        proc.stderr[-2000:]


def test_the_token_is_sent_even_when_it_starts_with_a_dash(images, tmp_path):
    """TorchServe's keys are URL-safe base64 (the key file of a run held "k_giUnIe"): one in 64 starts with
    "-", which ``--token KEY`` made argparse take for an option; locust then stopped before any request."""
    Answers.bodies, Answers.served = [GOOD], 0
    seen: list = []
    with json_server(Answers.next, headers=seen) as url:
        proc = _locust(url, images, tmp_path / "t", token="-k_giUnIe")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seen and {h.get("Authorization") for h in seen} == {"Bearer -k_giUnIe"}, seen[:2]
    assert summary(tmp_path / "t")["failures"] == 0


@pytest.mark.parametrize("env,extra,message", [
    ({"MAX_IMAGES": "abc"}, [], "error: --max-images (MAX_IMAGES) must be an integer >= 1, not 'abc'"),
    ({}, ["--schema", "stock", "--topk", "3"], "error: --topk (TOPK) does not apply to --schema stock"),
])
def test_more_bad_settings_are_one_line(images, tmp_path, env, extra, message):
    """MAX_IMAGES=abc was int()-ed while locust built its parser: two tracebacks and exit 1."""
    import os
    cmd = locust_command("http://127.0.0.1:9", images=images, model="m", users=1, seconds=30, prefix=tmp_path / "p",
                         stop_timeout=None) + extra
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_payloads_skip_hidden_files_and_folders_named_like_images(images):
    """macOS `._a.jpg` files were sent (and failed), and a folder named `x.jpg` stopped locust with a traceback."""
    (images / "._0.png").write_bytes(b"AppleDouble")
    (images / "album.jpg").mkdir()
    (images / "album.jpg" / "inside.JPG").write_bytes(encode(pattern_image("circle", size=20), "JPEG"))
    code = ("import json, locustfile; print(json.dumps(sorted(n for n, _, _ in locustfile.load_payloads("
            f"{str(images)!r}, 100))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == ["0.png", "1.png", "2.png", "inside.JPG"]


def test_the_oip_check_accepts_what_the_handler_answers_with_adaptive_tta():
    """inference.oip adds a tta_applied BOOL output with adaptive TTA: the check failed every such answer."""
    code = """
import json, locustfile
from inference.oip import oip_answer
from inference.requests import Request
result = {"predictions": [{"class": "cat", "index": 1, "confidence": 0.75}], "tta": "flip"}
req = Request([b"x"], multi=True, protocol="oip_v2")
adaptive = oip_answer(req, [{**result, "tta_applied": True}], model_name="m", model_version="1")
plain = oip_answer(req, [result], model_name="m", model_version="1")
bad = json.loads(json.dumps(plain)); bad["outputs"][2]["data"] = [True]
print(json.dumps([locustfile.check_oip_v2_body(b, None) for b in (adaptive, plain, bad)]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [None, None, "indices: expected int values"]


def test_payloads_are_listed_as_training_lists_a_folder(tmp_path):
    """The locustfile had its own listing: it sent the images of hidden folders (`.thumbs/`) and did not follow a
    symlinked folder, where training, `predict` and INT8's calibration (inference.image_files) do the opposite."""
    from inference.image_files import image_files
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / ".thumbs").mkdir(parents=True)
    elsewhere.mkdir()
    png = encode(pattern_image("circle", size=20))
    for path in (photos / "a.png", photos / ".thumbs" / "a.png", elsewhere / "b.png"):
        path.write_bytes(png)
    (photos / "linked").symlink_to(elsewhere, target_is_directory=True)
    code = ("import json, locustfile; print(json.dumps(sorted(n for n, _, _ in locustfile.load_payloads("
            f"{str(photos)!r}, 100))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == ["a.png", "b.png"]
    assert [p.rsplit("/", 1)[1] for p in image_files(str(photos))] == ["a.png", "b.png"]


def _answer_as_asked(request: bytes) -> dict:
    """A good answer in the request's own protocol (raw bytes: this project's, JSON: KServe v1 or OIP v2)."""
    if not request.startswith(b"{"):
        return GOOD
    body = json.loads(request)
    if "instances" in body:
        return {"predictions": [GOOD]}
    tensor = {"shape": [1, 1]}
    return {"model_name": "m", "outputs": [{**tensor, "name": "labels", "datatype": "BYTES", "data": ["circle"]},
                                           {**tensor, "name": "scores", "datatype": "FP32", "data": [0.75]},
                                           {**tensor, "name": "indices", "datatype": "INT64", "data": [0]}]}


@pytest.mark.parametrize("schema", ["kserve_v1", "oip_v2"])
def test_json_schemas_are_answered_past_a_proxy_variable(images, tmp_path, schema, monkeypatch):
    """The start-up check went through http_proxy where locust's own client does not, and stopped the run ("nothing
    answers"); the JSON schemas' bodies, now built once per image, are still each image's JSON."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    seen, sent = [], []
    with json_server(_answer_as_asked, headers=seen, bodies=sent) as url:
        proc = _locust(url, images, tmp_path / "j", "--schema", schema)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = summary(tmp_path / "j")
    assert s["requests"] >= 3 and s["failures"] == 0, s
    assert {h.get("Content-Type") for h in seen} == {"application/json"}
    assert len(set(sent)) == 3  # three images, each body the same bytes every time it is sent
    assert all(json.loads(b) for b in sent)


def test_a_200_that_is_not_json_is_one_failure_row(images, tmp_path):
    """An answer whose charset cannot be told (a proxy's or cache's binary body) made r.json() raise TypeError: the
    request was counted nowhere. Failures named the image, one row per image for one fault."""
    with json_server(lambda request: b"\x89PNG\r\n\x1a\n\x00\xff\xfe", content_type="application/octet-stream") as url:
        _locust(url, images, tmp_path / "b")
    s = summary(tmp_path / "b")
    assert s["requests"] >= 3 and s["failures"] == s["requests"], s
    rows = (tmp_path / "b_failures.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and "response is not JSON" in rows[0], rows


def test_final_stats_into_a_missing_folder_stops_locust_at_start_up(images, tmp_path):
    """Found out only as locust quit, after the whole run: a traceback, no figures, and exit status 0."""
    proc = _locust("http://127.0.0.1:9", images, tmp_path / "f", "--final-stats", str(tmp_path / "no" / "f.json"),
                   seconds=30)
    assert proc.returncode != 0 and f"error: --final-stats {tmp_path / 'no' / 'f.json'}: " in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_one_image_file_is_a_payload_set(images):
    code = f"import locustfile; print([n for n, _, _ in locustfile.load_payloads({str(images / '1.png')!r}, 10)])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "['1.png']", proc.stderr[-2000:]


def test_each_images_body_is_built_once_per_schema():
    """Base64 and JSON encoding ran for every request: 12.6 ms of locust's CPU per 2.5 MB photo, on the machine whose
    server it measures. The bodies are built on first use and kept (per schema and top-k)."""
    code = """
import json, types, locustfile
locustfile.PAYLOADS[:] = [("a.png", b"\\x89PNG-a", "image/png"), ("b.png", b"\\x89PNG-b", "image/png")]
built = []
def build(data, ctype, topk):
    built.append(data)
    return locustfile.SCHEMAS["oip_v2"][1](data, ctype, topk)
user = types.SimpleNamespace(bodies=locustfile._BODIES.setdefault(("oip_v2", 3), {}), build=build, topk=3,
                             auth={"Authorization": "Bearer k"})
sent = [locustfile.ClassifierUser._request(user, i) for i in (0, 1, 0, 1, 0)]
print(json.dumps([len(built), [r["headers"]["Authorization"] for r in sent], json.loads(sent[2]["data"])]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, auth, body = json.loads(proc.stdout.splitlines()[-1])
    assert count == 2 and auth == ["Bearer k"] * 5
    assert body["parameters"] == {"topk": 3} and body["inputs"][0]["datatype"] == "BYTES"
