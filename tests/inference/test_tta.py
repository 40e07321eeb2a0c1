"""inference.tta: views, aggregation and adaptive gating as batched forwards."""
import pytest
import torch

from inference.tta import (
    adaptive_predict_proba,
    aggregate,
    canvas_preset,
    num_views,
    predict_proba,
    tta_views,
    uncertain,
)


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
    # views that disagree unevenly tell the two apart: softmax of the mean logits [2, 0.5] vs the mean of
    # softmax([4, 0]) and softmax([0, 1]), by hand
    uneven = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    e = torch.e
    by_logits = torch.tensor([[e ** 2 / (e ** 2 + e ** 0.5), e ** 0.5 / (e ** 2 + e ** 0.5)]])
    by_softmax = torch.tensor([[(e ** 4 / (e ** 4 + 1) + 1 / (1 + e)) / 2, (1 / (e ** 4 + 1) + e / (1 + e)) / 2]])
    assert torch.allclose(aggregate(uneven, 1, how="logits"), by_logits, atol=1e-6)
    assert torch.allclose(aggregate(uneven, 1, how="softmax"), by_softmax, atol=1e-6)
    assert not torch.allclose(by_logits, by_softmax, atol=1e-2)
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
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
    nan = torch.full((1, 3), float("nan"))  # an overflowed forward's softmax: no certainty
    assert uncertain(nan, metric="confidence").tolist() == uncertain(nan, metric="margin").tolist() == [True]
    with pytest.raises(ValueError, match="confidence or margin"):
        uncertain(probs, metric="entropy")


@pytest.mark.parametrize("mode, scales", [("multi_scale", (1.0, 0.8, 1.2)), ("multi_scale", (0.9, 1.0)),
                                          ("five_crop", (1.0,)), ("flip", (1.0,))])
def test_adaptive_tta_equals_full_tta_where_applied_and_builds_views_only_for_those(mode, scales):
    canvas = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return _logits(x)

    first = tta_views(canvas, mode, crop_size=16, scales=scales)[:6]  # the first view, whatever the mode
    threshold = _logits(first).softmax(-1).max(1).values.median().item()
    probs, applied = adaptive_predict_proba(forward, canvas, mode, crop_size=16, scales=scales, threshold=threshold)
    full = predict_proba(_logits, canvas, mode, crop_size=16, scales=scales)
    m = int(applied.sum())
    assert 0 < m < 6 and torch.allclose(probs[applied], full[applied], atol=1e-6)
    assert seen == [6, (num_views(mode, scales) - 1) * m]


def test_a_new_tta_mode_is_one_registry_entry(monkeypatch):
    """Views, their count, the canvas rule and adaptive TTA's first view all read inference.tta.MODES: a
    vertical-flip mode is one entry."""
    from inference import tta

    vflip = tta.TTAMode("vflip", lambda c, crop, s: torch.cat([tta._center(c, crop), tta._center(c, crop).flip(-2)]),
                        lambda s: 2, cuts_from_resize=False, in_graph=False)
    monkeypatch.setitem(tta.MODES, "vflip", vflip)
    canvas = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    views = tta.tta_views(canvas, "vflip", crop_size=4)
    assert tta.num_views("vflip") == 2 and torch.equal(views, torch.cat([canvas, canvas.flip(-2)]))
    assert tta.canvas_preset("vflip", crop_size=4, resize_size=6).crop_size == 4  # cut from the crop itself
    assert tta.canvas_preset("five_crop", crop_size=4, resize_size=6).crop_size == 6  # (not the resize square)
    forward = lambda x: x.float().flatten(1)[:, :5]  # noqa: E731  (a "model": five pixel values as logits)
    probs, applied = tta.adaptive_predict_proba(forward, canvas, "vflip", crop_size=4, threshold=1.1)
    assert applied.all() and torch.allclose(probs, tta.predict_proba(forward, canvas, "vflip", crop_size=4))
    with pytest.raises(ValueError, match=r"unknown TTA mode 'hflip'; choose one of"):
        tta.num_views("hflip")


def test_five_and_ten_crop_views_are_torchvisions():
    """Every view against torchvision's own five_crop/ten_crop (the independent reference, which also fixes
    where each corner's crop sits), as a set per image: ours are view-major (all images' center, then ...)."""
    from torchvision.transforms.v2 import functional as F
    # an odd height margin (where rounding shows); an even width margin: torchvision's ten_crop crops the flipped
    # image, ours flips the crops, the same views unless the center crop's left margin had to be rounded
    canvas = torch.randint(0, 256, (2, 3, 21, 20), dtype=torch.uint8)
    for mode, reference in (("five_crop", F.five_crop), ("ten_crop", F.ten_crop)):
        ours = tta_views(canvas, mode, crop_size=16).view(-1, 2, 3, 16, 16)
        for i in range(2):
            theirs = reference(canvas[i], [16, 16])
            assert len(theirs) == ours.shape[0]
            assert sorted(v.flatten().tolist() for v in ours[:, i]) == sorted(v.flatten().tolist() for v in theirs)
        if mode == "five_crop":  # and view 0 is torchvision's center crop
            assert torch.equal(ours[0], F.center_crop(canvas, [16, 16]))
