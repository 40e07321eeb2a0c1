"""inference.transforms: the evaluation transform and normalization."""
import torch
from torchvision.transforms.v2 import functional as F

from inference.transforms import EvalPreset, normalize


def test_eval_preset_resizes_shorter_side_then_center_crops():
    preset = EvalPreset(crop_size=24, resize_size=32)
    image = torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = preset(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    # torchvision's functional ops as the reference: shorter side 40 -> 32 (64 -> 51), antialiased, then crop
    reference = F.center_crop(F.resize(image, [32, 51], antialias=True), [24, 24])
    assert torch.equal(out.contiguous(), reference.contiguous())


def test_eval_preset_batch_equals_one_by_one_for_mixed_sizes():
    preset = EvalPreset(crop_size=16, resize_size=20)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in
              [(3, 30, 40), (3, 16, 16), (3, 30, 40), (3, 50, 21)]]
    batch = preset.batch(images)
    assert batch.shape == (4, 3, 16, 16)
    for i, img in enumerate(images):
        assert torch.equal(batch[i], preset(img))


def test_normalize_matches_definition():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = normalize(x, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    for c, (m, s) in enumerate(zip((0.1, 0.2, 0.3), (0.5, 0.25, 0.2))):
        assert torch.allclose(y[:, c], (x[:, c].float() / 255 - m) / s)
