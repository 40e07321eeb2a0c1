"""Admission control on a real TorchServe: images that are small on the wire and huge decoded are refused
from their headers, in every accepted format, within seconds, while a good neighbour in the same batch
is answered; the workers' memory stays bounded (measured from their PIDs)."""
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from tests.conftest import encode, pattern_image
from tools.processes import worker_processes

pytestmark = pytest.mark.slow

GOOD = encode(pattern_image("circle", size=30))
SIDE = 6500  # 42.25 MP: over our 40 MP per image, under Pillow's own 89 MP warning and 179 MP error


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _bombs() -> dict[str, bytes]:
    one_bit, gray = Image.new("1", (SIDE, SIDE)), Image.new("L", (SIDE, SIDE))
    return {"png": _encode(one_bit, "PNG"), "gif": _encode(one_bit, "GIF"), "bmp": _encode(one_bit, "BMP"),
            "tiff": _encode(one_bit, "TIFF", compression="group4"), "jpeg": _encode(gray, "JPEG", quality=50),
            "webp": _encode(gray, "WEBP", quality=10, method=0)}


def _post(url, **kwargs):
    start = time.perf_counter()
    r = requests.post(url, timeout=60, **kwargs)
    return r.status_code, r.json(), time.perf_counter() - start


def _rss(server) -> int:
    return sum(p.memory_info().rss for p in worker_processes(server.pid))


def test_decoded_size_bombs_are_refused_from_the_header_while_a_neighbour_succeeds(server):
    url = f"{server.url}/predictions/shapes"
    frames = [Image.new("RGB", (8, 8), (i % 256, i * 7 % 256, i * 13 % 256)) for i in range(3000)]
    many_small = [base64.b64encode(_encode(Image.new("1", (3000, 3000)), "PNG")).decode()] * 30  # 270 MP, ~50 KB
    cases = {**{f"{fmt} {SIDE}x{SIDE}": (data, 413, "the limit is 40000000") for fmt, data in _bombs().items()},
             "40000x100 strip": (_encode(Image.new("1", (40000, 100)), "PNG"), 413, "aspect ratio"),
             "3000-frame gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10), 413,
                                "more than 1000 frames")}
    rss_before = _rss(server)
    for name, (data, status, words) in cases.items():
        assert len(data) < 6_000_000, name
        _reset_peak_rss(server)
        case_before = _rss(server)
        with ThreadPoolExecutor(2) as pool:  # sent together: one batch (300 ms window on this server)
            bad = pool.submit(_post, url, data=data, headers={"Content-Type": "application/octet-stream"})
            good = pool.submit(_post, url, data=GOOD, headers={"Content-Type": "image/png"})
            (code, body, seconds), (good_code, good_body, _) = bad.result(), good.result()
        peak = _peak_rss(server) - case_before  # a bomb decoded and freed again would show here (42 MP: >= 127 MB)
        print(f"{name}: {len(data)} bytes -> {code} in {seconds:.2f} s, workers' peak RSS +{peak / 2**20:.0f} MiB: "
              f"{body.get('detail')}")
        assert peak < 100 * 2**20, f"{name}: the workers' peak RSS grew by {peak / 2**20:.0f} MiB"
        assert code == status and words in body["detail"] and seconds < 5, (name, body)
        assert good_code == 200 and good_body["predictions"]
    code, body, seconds = _post(url, json={"data": many_small})
    print(f"30 x 9 MP PNGs ({sum(map(len, many_small))} bytes of base64) -> {code} in {seconds:.2f} s")
    assert code == 413 and body["error"] == "request too large" and seconds < 5
    fits = _encode(Image.new("L", (3000, 2000), 128), "PNG")  # 6 MP: within every budget
    code, body, _ = _post(url, data=fits, headers={"Content-Type": "image/png"})
    assert code == 200 and body["predictions"]
    growth = _rss(server) - rss_before
    print(f"workers' RSS growth over the admission cases: {growth / 2**20:.0f} MiB")
    assert growth < 1.5 * 2**30


def test_files_of_countless_tiny_segments_are_refused_in_milliseconds_while_a_neighbour_succeeds(server):
    """4 MiB of the segments that Pillow reads one by one in Python (empty PNG chunks, JPEG COM markers, GIF
    comment blocks, TIFF tags) or a TIFF page listing a million strips: each held the worker for 1-2.6 s (an
    opening to probe, one to decode; the TIFF 9.7 s) and a 16 MiB request of them ~10 s; refused from a walk of
    their structure (inference.containers), 400."""
    from tests.inference.test_containers import HOSTILE
    url = f"{server.url}/predictions/shapes"
    cases = ["JPEG, empty COM markers", "PNG, empty chunks before the image", "PNG, empty chunks after the image",
             "GIF, 1-byte sub-blocks", "TIFF, one page of many tags", "TIFF, a million strips of a 64x64 image",
             "JPEG, end of image, then empty COM markers", "PNG, 100 ICC profiles inflating to 1 MiB each",
             "TIFF, 2,000 fractions in a tag"]
    for name in cases:
        data = HOSTILE[name][0]()
        with ThreadPoolExecutor(2) as pool:  # sent together: one batch
            bad = pool.submit(_post, url, data=data, headers={"Content-Type": "application/octet-stream"})
            good = pool.submit(_post, url, data=GOOD, headers={"Content-Type": "image/png"})
            (code, body, seconds), (good_code, good_body, _) = bad.result(), good.result()
        print(f"{name}: {len(data)} bytes -> {code} in {seconds:.2f} s: {body.get('detail', body)!r:.90}")
        assert code == 400 and body["error"] == "bad image" and "refused" in body["detail"] and seconds < 5, body
        assert good_code == 200 and good_body["predictions"]


def _peak_rss(server) -> int:
    """The workers' peak resident memory (VmHWM) since :func:`_reset_peak_rss`, summed."""
    total = 0
    for p in worker_processes(server.pid):
        with open(f"/proc/{p.pid}/status") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return total


def _reset_peak_rss(server) -> None:
    for p in worker_processes(server.pid):  # Linux: "5" resets the peak RSS to the current RSS
        with open(f"/proc/{p.pid}/clear_refs", "w") as f:
            f.write("5")


def test_phone_photos_within_budget_are_decoded_in_bounded_memory(server):
    """Five 12 MP JPEGs in one request (61 MP at full size; admission counts what they are decoded to,
    about 1 MP reduced): answered, and the workers' peak memory grows by a small multiple of the canvases
    (reduced decoding, one image at a time), not by the 5 x 36 MB of full-size RGB."""
    from tools.photos import phone_photo
    photos = [phone_photo(Image.fromarray(pattern_image(k, size=200, seed=i)), noise=0, sideways=i % 2 == 1)
              for i, k in enumerate(["circle", "vertical", "horizontal", "circle", "vertical"])]
    url = f"{server.url}/predictions/shapes"
    _post(url, data=photos[0], headers={"Content-Type": "image/jpeg"})  # warm the worker's allocator
    _reset_peak_rss(server)
    rss_before = _rss(server)
    code, body, seconds = _post(url, json={"data": [base64.b64encode(p).decode() for p in photos]})
    growth = _peak_rss(server) - rss_before
    print(f"5 x 12 MP JPEGs ({sum(map(len, photos))} bytes) -> {code} in {seconds:.2f} s; workers' peak RSS "
          f"growth {growth / 2**20:.0f} MiB")
    assert code == 200 and len(body) == 5 and all(b["predictions"] for b in body)
    assert growth < 100 * 2**20  # full-size decoding would hold 5 x 36 MB of RGB at least


def test_the_costliest_images_within_budget_decode_within_the_workers_decode_memory(server):
    """Three 38 MP WEBPs (a few KB each; libwebp holds about 18 bytes a pixel while decoding, 0.7 GB each), one
    a request, in one batch with a good neighbour: each fits the pixel budgets (115 MP in all) and is answered,
    and the worker's decode pool (2 threads here) decodes them one at a time within its decode memory (1 GiB),
    so that the workers' peak RSS grows by less than the issue's 1.5 GB."""
    from inference.decode_memory import DEFAULT_MAX_DECODE_BYTES, decode_bytes
    from inference.images import probe

    webp = _encode(Image.new("L", (6200, 6200), 90), "WEBP", quality=10, method=0)
    url = f"{server.url}/predictions/shapes"
    _post(url, data=GOOD, headers={"Content-Type": "image/png"})  # a warm worker
    _reset_peak_rss(server)
    rss_before = _rss(server)
    with ThreadPoolExecutor(4) as pool:  # sent together: one batch (300 ms window on this server)
        big = [pool.submit(_post, url, data=webp, headers={"Content-Type": "image/webp"}) for _ in range(3)]
        good = pool.submit(_post, url, data=GOOD, headers={"Content-Type": "image/png"})
        answers = [f.result() for f in big]
        good_code, good_body, _ = good.result()
    growth = _peak_rss(server) - rss_before
    print(f"3 x 38 MP WEBP ({len(webp)} bytes each) -> {[a[0] for a in answers]} in "
          f"{max(a[2] for a in answers):.1f} s; workers' peak RSS growth {growth / 2**20:.0f} MiB")
    assert [a[0] for a in answers] == [200] * 3 and good_code == 200 and good_body["predictions"]
    assert growth < 1.5e9
    # one at a time (two of 0.7 GB exceed the 1 GiB decode memory): under 1.5 decodes' worth; two at once,
    # without the bound, measured 1175 MiB here
    one = decode_bytes(probe(webp))
    assert 2 * one > DEFAULT_MAX_DECODE_BYTES
    assert growth < 1.5 * one, f"{growth / 2**20:.0f} MiB: more than one decode at a time"


def test_a_batch_over_its_pixel_budget_answers_503_to_the_requests_past_it_and_the_rest_normally(server):
    """One batch of a real TorchServe: four 38 MP PNGs (one a request; 154 MP against the worker's 128 MP), a
    request of 30 small PNGs that decode to 270 MP, and a good 30x30 PNG. The first three big ones fit the batch
    (115 MP) and are answered, the fourth gets 503 `busy` with a JSON reason (retry), the 270 MP request 413,
    the good one 200; the refused big one, sent again alone, gets 200."""
    big = _encode(Image.new("L", (6200, 6200), 90), "PNG")
    many_small = [base64.b64encode(_encode(Image.new("1", (3000, 3000)), "PNG")).decode()] * 30
    url = f"{server.url}/predictions/shapes"
    with ThreadPoolExecutor(6) as pool:  # sent together: one batch (300 ms window, batch size 8)
        bigs = [pool.submit(_post, url, data=big, headers={"Content-Type": "image/png"}) for _ in range(4)]
        small = pool.submit(_post, url, json={"data": many_small})
        good = pool.submit(_post, url, data=GOOD, headers={"Content-Type": "image/png"})
        answers = [f.result() for f in bigs]
        (small_code, small_body, _), (good_code, good_body, _) = small.result(), good.result()
    codes = [a[0] for a in answers]
    print(f"4 x 38 MP PNG ({len(big)} bytes each) -> {codes}; 30 x 9 MP PNGs -> {small_code}; good -> {good_code}; "
          f"{max(a[2] for a in answers):.1f} s")
    assert sorted(codes) == [200, 200, 200, 503], codes
    busy = next(body for code, body, _ in answers if code == 503)
    assert busy["error"] == "busy" and "decoded pixels per batch is taken by other requests" in busy["detail"], busy
    assert small_code == 413 and small_body["error"] == "request too large"
    assert good_code == 200 and good_body["predictions"]
    code, body, _ = _post(url, data=big, headers={"Content-Type": "image/png"})
    assert code == 200 and body["predictions"]  # retried alone, it fits
