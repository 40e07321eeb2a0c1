"""inference.transforms: the evaluation transform and normalization."""
import torch

from inference.transforms import EvalPreset, normalize


def test_eval_preset_resizes_shorter_side_then_center_crops():
    preset = EvalPreset(crop_size=24, resize_size=32)
    out = preset(torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8))
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


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
    assert torch.allclose(y[:, 1], (x[:, 1].float() / 255 - 0.2) / 0.25)
