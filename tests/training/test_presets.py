import torch

from training.presets import EvalPreset, TrainPreset, normalize
import pytest

from training.tta import adaptive_predict_proba, aggregate, canvas_preset, predict_proba, tta_views, uncertain


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
    assert torch.allclose(aggregate(torch.zeros(4, 3), 4), torch.full((4, 3), 1 / 3))


def _logits(batch):
    """A deterministic stand-in model: 3 logits from channel means of the image halves."""
    x = batch.float()
    return torch.stack([x[:, 0].mean((1, 2)), x[:, 1, :, : x.shape[-1] // 2].mean((1, 2)),
                        x[:, 2, : x.shape[-2] // 2].mean((1, 2))], 1) / 40


@pytest.mark.parametrize("mode,views", [("none", 1), ("flip", 2), ("five_crop", 5), ("ten_crop", 10),
                                        ("multi_scale", 3)])
def test_tta_views_shapes_and_center_first(mode, views):
    canvas = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    out = tta_views(canvas, mode, crop_size=16)
    assert out.shape == (views * 4, 3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out[:4], canvas[..., 2:18, 2:18])  # view 0 is the center crop


def test_ten_crop_is_five_crop_and_its_flips():
    canvas = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    five, ten = tta_views(canvas, "five_crop", crop_size=16), tta_views(canvas, "ten_crop", crop_size=16)
    assert torch.equal(ten[:10], five) and torch.equal(ten[10:], five.flip(-1))
    assert torch.equal(five[2:4], canvas[..., :16, :16])  # then top-left


def test_multi_scale_views_zoom_around_the_center():
    canvas = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8)
    views = tta_views(canvas, "multi_scale", crop_size=16, scales=(1.0, 1.5))
    from torchvision.transforms.v2 import functional as F
    assert torch.equal(views[1:], F.resize(canvas, [16, 16], antialias=True))  # 1.5 x 16 = the whole canvas


def test_canvas_is_the_eval_transform_for_flip_and_the_resize_square_otherwise():
    assert canvas_preset("flip", crop_size=24, resize_size=28).crop_size == 24
    five = canvas_preset("five_crop", crop_size=24, resize_size=28)
    assert (five.crop_size, five.resize_size) == (28, 28)
    with pytest.raises(ValueError, match="unknown TTA mode"):
        canvas_preset("rotate", crop_size=24)


def test_mean_logits_aggregation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # 2 views of 1 image
    assert torch.allclose(aggregate(logits, 1, how="logits"), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(aggregate(logits, 1, how="softmax"), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError):
        aggregate(logits, 1, how="median")


def test_adaptive_tta_applies_views_only_below_the_threshold():
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8, generator=g)
    calls = []

    def forward(x):
        calls.append(len(x))
        return _logits(x)

    plain = _logits(tta_views(canvas, "none", crop_size=16)).softmax(-1)
    threshold = plain.max(1).values.median().item()
    probs, applied = adaptive_predict_proba(forward, canvas, "ten_crop", crop_size=16, threshold=threshold)
    full = predict_proba(_logits, canvas, "ten_crop", crop_size=16)
    assert applied.tolist() == (plain.max(1).values < threshold).tolist() and 0 < applied.sum() < 8
    assert torch.allclose(probs[applied], full[applied], atol=1e-6)      # TTA where uncertain
    assert torch.allclose(probs[~applied], plain[~applied], atol=1e-6)   # plain where confident
    assert calls == [8, 9 * int(applied.sum())]                           # two forwards, extras only
    calls.clear()
    _, none = adaptive_predict_proba(forward, canvas, "flip", crop_size=16, threshold=0.0)
    assert not none.any() and calls == [8]


def test_uncertainty_metrics():
    probs = torch.tensor([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05]])
    assert uncertain(probs, metric="confidence", threshold=0.6).tolist() == [True, False]
    assert uncertain(probs, metric="margin", threshold=0.1).tolist() == [True, False]
    with pytest.raises(ValueError, match="confidence or margin"):
        uncertain(probs, metric="entropy")


# --------------------------------------------------------------------------- TrainPreset options

def _image(h=40, w=48, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_train_preset_default_is_eval_resize_pad_crop_and_flip():
    preset = TrainPreset(crop_size=24, resize_size=28)
    assert preset.describe()[1:] == ["PadRandomCrop(padding=4, padding_mode=reflect)", "RandomHorizontalFlip(p=0.5)"]
    img = _image()
    base = EvalPreset(crop_size=24, resize_size=28)(img)
    padded = torch.nn.functional.pad(base[None].float(), [4] * 4, mode="reflect")[0].to(torch.uint8)
    torch.manual_seed(0)
    for _ in range(20):
        out = preset(img)
        windows = [padded[:, t:t + 24, l:l + 24] for t in range(9) for l in range(9)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)
    plain = TrainPreset(crop_size=24, resize_size=28, padding=0, hflip_prob=0.0)
    assert torch.equal(plain(img), base) and "Flip" not in repr(plain)


@pytest.mark.parametrize("kwargs", [
    dict(mode="random_resized_crop", scale=(0.3, 1.0)),
    dict(mode="none", rotation=15),
    dict(color_jitter=0.4),
    dict(affine=0.2),
    dict(auto_augment="randaugment", ra_magnitude=12),
    dict(auto_augment="trivialaugment"),
    dict(random_erase=1.0),
    dict(mode="random_resized_crop", hflip_prob=1.0, rotation=10, color_jitter=0.3, affine=0.1,
         auto_augment="trivialaugment", random_erase=0.5),
])
def test_train_preset_options_keep_uint8_crop_output(kwargs):
    preset = TrainPreset(crop_size=24, **kwargs)
    torch.manual_seed(0)
    for seed in range(4):
        out = preset(_image(seed=seed))
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def test_train_preset_repr_lists_the_active_steps():
    preset = TrainPreset(crop_size=32, mode="random_resized_crop", rotation=10, color_jitter=0.4, affine=0.1,
                         auto_augment="randaugment", random_erase=0.25)
    text = repr(preset)
    order = ["RandomResizedCrop(32", "RandomHorizontalFlip(p=0.5)", "RandomRotation", "RandomAffine", "ColorJitter",
             "RandAugment", "RandomErasing(p=0.25"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions) and "PadRandomCrop" not in text
    assert len(preset.describe()) == len(order)
    assert "TrivialAugmentWide" in repr(TrainPreset(crop_size=32, auto_augment="trivialaugment"))


def test_random_resized_crop_spans_the_source_image():
    img = torch.zeros((3, 64, 64), dtype=torch.uint8)
    img[:, :32] = 255  # top half white
    preset = TrainPreset(crop_size=16, mode="random_resized_crop", scale=(0.05, 0.1), hflip_prob=0.0)
    torch.manual_seed(0)
    means = {preset(img).float().mean().item() for _ in range(30)}
    assert 0.0 in means and 255.0 in means  # small crops fall entirely in either half


def test_random_erase_on_uint8_writes_zeros():
    img = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    preset = TrainPreset(crop_size=32, padding=0, hflip_prob=0.0, random_erase=1.0)
    torch.manual_seed(0)
    out = preset(img)
    erased = (out == 0).all(0)
    assert out.dtype == torch.uint8 and 0 < erased.sum() < 32 * 32
    assert ((out == 0) | (out == 200)).all()
    rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
    assert erased.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle


def test_train_preset_rejects_bad_options():
    for kwargs, match in ((dict(mode="crop"), "mode"), (dict(auto_augment="augmix"), "auto_augment"),
                          (dict(random_erase=1.5), "probability"), (dict(affine=1.0), "affine")):
        with pytest.raises(ValueError, match=match):
            TrainPreset(crop_size=8, **kwargs)
