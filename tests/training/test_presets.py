import torch

from training.presets import EvalPreset, TrainPreset, normalize
from training.tta import aggregate, predict_proba, tta_views


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


def test_train_preset_output_matches_eval_size():
    out = TrainPreset(crop_size=24, resize_size=26)(torch.randint(0, 256, (3, 30, 30), dtype=torch.uint8))
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_normalize_matches_definition():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = normalize(x, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2))
    assert torch.allclose(y[:, 1], (x[:, 1].float() / 255 - 0.2) / 0.25)


def test_flip_tta_is_one_forward_and_mean_softmax():
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    views = tta_views(x, "flip")
    assert views.shape == (10, 3, 8, 8) and torch.equal(views[5:], x.flip(-1))
    calls = []

    def forward(batch):
        calls.append(len(batch))
        return batch.float().mean((2, 3))[:, :2] * torch.tensor([1.0, -1.0])

    probs = predict_proba(forward, x, "flip")
    assert calls == [10] and probs.shape == (5, 2)
    expected = (forward(x).softmax(-1) + forward(x.flip(-1)).softmax(-1)) / 2
    assert torch.allclose(probs, expected)
    assert torch.allclose(aggregate(torch.zeros(4, 3), "none"), torch.full((4, 3), 1 / 3))
