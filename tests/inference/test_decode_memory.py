"""inference.decode_memory: the decodes running at once hold at most the budget's estimated bytes, whatever
the pool's size; one larger than the budget runs alone; the estimate follows the format."""
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from inference.decode_memory import BYTES_PER_PIXEL, DecodeMemory, decode_bytes
from inference.images import decode_many, probe
from inference.transforms import EvalPreset


def _encode(fmt: str, size=(400, 300), **kwargs) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_the_estimate_follows_the_format_and_the_dct_reduction():
    webp, png, jpeg = (probe(_encode(f)) for f in ("WEBP", "PNG", "JPEG"))
    assert decode_bytes(webp) == 400 * 300 * BYTES_PER_PIXEL["WEBP"] > decode_bytes(png) == 400 * 300 * 10
    assert decode_bytes(jpeg, 37) == 50 * 38 * BYTES_PER_PIXEL["JPEG"]  # 1/8 in the DCT: 50x38 (short side 38 >= 37)
    assert decode_bytes(jpeg, 40) == 100 * 75 * BYTES_PER_PIXEL["JPEG"]  # 38 < 40: 1/4
    progressive = probe(_encode("JPEG", progressive=True))
    assert decode_bytes(progressive, 37) == 400 * 300 * 4  # counted at full size: libjpeg holds its coefficients


def test_holds_wait_for_room_and_one_over_the_budget_runs_alone():
    memory, inside, order = DecodeMemory(100), [], []

    def job(name, n, seconds):
        with memory.hold(n):
            inside.append(name)
            order.append((name, sorted(inside)))
            time.sleep(seconds)
            inside.remove(name)
    threads = [threading.Thread(target=job, args=("a", 60, 0.2))]
    threads[0].start()
    time.sleep(0.05)
    threads += [threading.Thread(target=job, args=(k, n, 0.05)) for k, n in (("b", 60), ("big", 500))]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(5)
    assert order[0] == ("a", ["a"]) and all(len(names) == 1 for _, names in order)  # b waited for a, big ran alone
    assert memory.held == 0 and memory.peak == 500


def test_a_pool_of_four_decodes_within_the_budget_and_answers_as_without_it():
    datas = [_encode("WEBP", (600, 400)) for _ in range(8)]
    infos = [probe(d) for d in datas]
    preset = EvalPreset(crop_size=32, resize_size=36)
    one = decode_bytes(infos[0])
    memory = DecodeMemory(2 * one)  # room for two of them at once
    with ThreadPoolExecutor(4) as pool:
        bounded = decode_many(datas, pool=pool, infos=infos, transform=preset, min_side=preset.min_decode_side,
                              memory=memory)
        free = decode_many(datas, pool=pool, infos=infos, transform=preset, min_side=preset.min_decode_side)
    assert memory.peak <= 2 * one and memory.held == 0
    assert all(a.equal(b) for a, b in zip(bounded, free))
