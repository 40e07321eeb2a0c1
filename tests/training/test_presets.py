"""training.presets: the training augmentation as one torchvision v2.Compose."""
import pytest
import torch

from inference.transforms import EvalPreset
from training.presets import TrainPreset


def test_train_preset_output_matches_eval_size():
    out = TrainPreset(crop_size=24, resize_size=26)(torch.randint(0, 256, (3, 30, 30), dtype=torch.uint8))
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


def _image(h=40, w=48, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_train_preset_default_is_eval_resize_pad_crop_and_flip():
    preset = TrainPreset(crop_size=24, resize_size=28)
    steps = preset.describe()
    assert [s.split("(")[0] for s in steps] == ["Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip"]
    assert "padding=[4, 4, 4, 4]" in steps[2] and "reflect" in steps[2] and steps[3] == "RandomHorizontalFlip(p=0.5)"
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
    order = ["RandomResizedCrop(size=(32, 32)", "RandomHorizontalFlip(p=0.5)", "RandomRotation", "RandomAffine", "ColorJitter",
             "RandAugment", "RandomErasing(p=0.25"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions) and "RandomCrop(" not in text
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


def test_the_decoders_min_side_never_shrinks_a_random_crop_below_the_crop_size():
    """A 12 MP phone photo trained with --preset photo decodes at 1/2 in the DCT domain (915 px min side): every
    crop torchvision's RandomResizedCrop draws from an image of that short side still has crop_size pixels on its
    short side (sampled with torchvision's own get_params, square and 4:3 images); a smaller image would not."""
    from torchvision.transforms import RandomResizedCrop

    from inference.images import jpeg_scale
    preset = TrainPreset(crop_size=224, mode="random_resized_crop")
    side = preset.min_decode_side
    assert side == 915 and jpeg_scale(4032, 3024, side) == 2 and jpeg_scale(1600, 1200, side) == 1
    torch.manual_seed(0)

    def narrowest(h, w):
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        return min(min(RandomResizedCrop.get_params(img, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])[2:])
                   for _ in range(20_000))
    assert narrowest(side, side) >= 224 and narrowest(side, side * 4 // 3) >= 224
    assert narrowest(side * 9 // 10, side * 9 // 10) < 224  # the bound is tight: 10% less and crops go below
    assert TrainPreset(crop_size=32, resize_size=36).min_decode_side == 36  # pad_crop: the evaluation resize
    assert TrainPreset(crop_size=224, mode="random_resized_crop", scale=(0.25, 1.0)).min_decode_side == 518


def test_cached_images_are_not_resized_and_cropped_a_second_time():
    """train --cache keeps each image through the evaluation resize and crop; the training preset applied them
    again, so with resize_size > crop_size every training image was magnified (28/24 here) against evaluation
    and serving. Cached, the preset starts from the cached crop: without augmentation it is the evaluation image."""
    from inference.transforms import EvalPreset
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    evaluation = EvalPreset(crop_size=24, resize_size=28)(image)
    cached = TrainPreset(crop_size=24, resize_size=28, mode="none", hflip_prob=0.0, cached=True)
    assert torch.equal(cached(evaluation), evaluation)
    assert not torch.equal(TrainPreset(crop_size=24, resize_size=28, mode="none", hflip_prob=0.0)(evaluation),
                           evaluation)  # what the cached run did: the crop resized to 28 and cropped again
    assert torch.equal(TrainPreset(crop_size=24, resize_size=28, mode="none", hflip_prob=0.0)(image), evaluation)
    assert cached.describe() == ["Identity()"]
    with pytest.raises(ValueError, match="random_resized_crop cannot crop cached images"):
        TrainPreset(crop_size=24, mode="random_resized_crop", cached=True)
