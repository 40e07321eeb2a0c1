"""The GPU decode path (nvjpeg through torchvision), run where CUDA exists; skipped elsewhere. The same
logic runs on the CPU in test_images.py::test_decode_many_batched_jpeg_path_equals_one_by_one."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from inference.images import ImageError, batch_jpeg_decoder, decode_many, decode_rgb
from tests.conftest import encode, pattern_image
from tests.handlers.test_fuzz import SEEDS, mutated_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_decoder(datas):
    return batch_jpeg_decoder("cuda")(datas)


def test_nvjpeg_batch_matches_cpu_and_isolates_a_bad_jpeg():
    good = [encode(pattern_image(k, size=64, seed=i), "JPEG", quality=90) for i, k in
            enumerate(["circle", "vertical", "horizontal"])]
    truncated = encode(pattern_image("circle", size=256), "JPEG")[:3000]
    out = decode_many([good[0], truncated, good[1], b"junk", good[2]], device=torch.device("cuda"),
                      jpeg_batch_decoder=gpu_decoder)
    for i, g in ((0, good[0]), (2, good[1]), (4, good[2])):
        assert out[i].is_cuda
        diff = (out[i].cpu().int() - decode_rgb(g).int()).abs().float()
        print(f"nvjpeg vs libjpeg-turbo: mean {diff.mean():.3f}, max {diff.max():.0f}")
        assert diff.mean() < 5 and diff.max() <= 16  # chroma upsampling differs at sharp colour edges
    assert isinstance(out[1], ImageError) and isinstance(out[3], ImageError)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_images())
def test_nvjpeg_survives_corrupted_jpegs(data):
    SEEDS  # the fuzz seeds: a PNG and a JPEG, mutated
    good = encode(pattern_image("circle", size=32), "JPEG")
    out = decode_many([good, data], device=torch.device("cuda"), jpeg_batch_decoder=gpu_decoder,
                      max_pixels=4_000_000)
    assert out[0].is_cuda and out[0].shape == (3, 32, 32)
    assert isinstance(out[1], ImageError) or (out[1].ndim == 3 and out[1].shape[0] == 3)
