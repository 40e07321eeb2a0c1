import pytest
import torch
from torch.nn.functional import one_hot

from training.mixing import BatchMixer

K = 10


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, 16, 16), generator=g), torch.randperm(K, generator=g)[:n]  # distinct labels


def test_disabled_mixer_returns_one_hot_targets():
    mixer = BatchMixer(num_classes=K)
    assert not mixer.enabled
    images, labels = _batch()
    out, targets = mixer(images, labels)
    assert out is images and targets.dtype == torch.float32
    assert torch.equal(targets, one_hot(labels, K).float())


def test_prob_zero_never_mixes_and_prob_one_always_mixes():
    images, labels = _batch()
    never = BatchMixer(num_classes=K, mixup_alpha=1.0, prob=0.0)
    assert never.enabled and torch.equal(never(images, labels)[1], one_hot(labels, K).float())
    torch.manual_seed(0)
    always = BatchMixer(num_classes=K, mixup_alpha=1.0, prob=1.0)
    mixed = [not torch.equal(always(images, labels)[1], one_hot(labels, K).float()) for _ in range(10)]
    assert all(mixed)


def test_mixup_images_are_the_convex_combination_of_the_target_weights():
    images, labels = _batch()
    mixer = BatchMixer(num_classes=K, mixup_alpha=0.4)
    torch.manual_seed(1)
    for _ in range(5):
        out, targets = mixer(images, labels)
        assert targets.shape == (8, K) and torch.allclose(targets.sum(1), torch.ones(8))
        lam = targets[0, labels[0]].item()
        assert torch.allclose(targets[:, labels.roll(1, 0)].diagonal(), torch.full((8,), 1 - lam))
        assert torch.allclose(out, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    images, labels = _batch()
    mixer = BatchMixer(num_classes=K, cutmix_alpha=1.0)
    torch.manual_seed(2)
    checked = 0
    for _ in range(10):
        out, targets = mixer(images, labels)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        pasted = (out != images).any(1)  # (N, H, W): pixels taken from the rolled batch
        assert torch.equal(out, torch.where(pasted[:, None], images.roll(1, 0), images))
        assert (pasted == pasted[0]).all()  # one box for the whole batch
        box = pasted[0]
        if box.any():
            rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
            assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle
            checked += 1
        area = box.float().mean().item()
        second = targets[:, labels.roll(1, 0)].diagonal()
        assert torch.allclose(second, torch.full((8,), area), atol=1e-6)
        assert torch.allclose(targets[torch.arange(8), labels], torch.full((8,), 1 - area), atol=1e-6)
    assert checked >= 5


def test_both_alphas_switch_between_cutmix_and_mixup():
    images, labels = _batch()
    torch.manual_seed(3)
    mixer = BatchMixer(num_classes=K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = set()
    for _ in range(30):
        out, targets = mixer(images, labels)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        lam = targets[0, labels[0]].item()
        if torch.allclose(out, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6) and 0 < lam < 1:
            kinds.add("mixup")
        elif torch.equal(out, torch.where((out != images).any(1, keepdim=True), images.roll(1, 0), images)):
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}
    only_cutmix = BatchMixer(num_classes=K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    for _ in range(5):
        out, _ = only_cutmix(images, labels)
        assert ((out == images) | (out == images.roll(1, 0))).all()


def test_bad_inputs_are_refused():
    mixer = BatchMixer(num_classes=K, mixup_alpha=1.0)
    images, labels = _batch()
    with pytest.raises(ValueError, match="float"):
        mixer((images * 255).to(torch.uint8), labels)
    with pytest.raises(ValueError, match="int64"):
        mixer(images, labels.float())
    with pytest.raises(ValueError, match="probability"):
        BatchMixer(num_classes=K, prob=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        BatchMixer(num_classes=K, cutmix_alpha=-1.0)
