import numpy as np
import pytest
import torch
from torch import nn

from training.losses import FocalLoss, build_loss, class_weights, target_distribution


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g) * 3
    hard = torch.randint(0, 5, (12,), generator=g)
    soft = torch.rand(12, 5, generator=g).softmax(1)  # what Mixup/CutMix hand over
    return logits, hard, soft


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_gamma_zero_is_cross_entropy(batch, ls, kind):
    logits, hard, soft = batch
    target = hard if kind == "hard" else soft
    expected = nn.CrossEntropyLoss(label_smoothing=ls)(logits, target)
    torch.testing.assert_close(FocalLoss(gamma=0.0, label_smoothing=ls)(logits, target), expected)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_gamma_zero_with_weights_is_weighted_cross_entropy(batch, kind):
    logits, hard, soft = batch
    target = hard if kind == "hard" else soft
    w = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.2])
    for reduction in ("mean", "sum", "none"):
        expected = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction=reduction)(logits, target)
        got = FocalLoss(gamma=0.0, weight=w, label_smoothing=0.1, reduction=reduction)(logits, target)
        torch.testing.assert_close(got, expected)


def test_focal_matches_the_formula(batch):
    logits, hard, _ = batch
    p = logits.softmax(1)
    pt = p[torch.arange(len(hard)), hard]
    expected = (-0.25 * (1 - pt) ** 2 * pt.log()).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.0, alpha=0.25)(logits, hard), expected)
    # per-class alpha picks the target class's factor
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    expected = (-alpha[hard] * (1 - pt) ** 2 * pt.log()).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.0, alpha=alpha)(logits, hard), expected)


def test_focal_on_soft_targets_sums_over_classes(batch):
    logits, _, soft = batch
    p = logits.softmax(1)
    t = soft * 0.9 + 0.1 / 5
    expected = (-(t * (1 - p) ** 1.5 * p.log()).sum(1)).mean()
    torch.testing.assert_close(FocalLoss(gamma=1.5, label_smoothing=0.1)(logits, soft), expected)


def test_focal_down_weights_easy_examples():
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    target = torch.tensor([0, 0])
    ce = FocalLoss(gamma=0.0, reduction="none")(logits, target)
    focal = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    assert (focal < ce).all()
    assert focal[0] / ce[0] < 1e-4 < focal[1] / ce[1]


def test_focal_gradients_are_finite_for_confident_logits():
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    loss = FocalLoss(gamma=0.5, label_smoothing=0.1)(logits, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_focal_is_float32_under_bf16_logits(batch):
    logits, hard, _ = batch
    loss = FocalLoss()(logits.bfloat16(), hard)
    assert loss.dtype == torch.float32


def test_focal_buffers_follow_the_module():
    m = FocalLoss(alpha=[1.0, 2.0], weight=[1.0, 3.0])
    assert set(dict(m.named_buffers())) == {"alpha", "weight"}
    m = m.double()
    assert m.weight.dtype == torch.float64
    assert "per-class" in repr(m)


@pytest.mark.parametrize("kwargs,said", [({"gamma": -1}, "gamma must be >= 0"),
                                         ({"label_smoothing": 1.5}, "label_smoothing must be in"),
                                         ({"reduction": "avg"}, "reduction must be one of"),
                                         ({"weight": [[1.0, 2.0]]}, "weight must be one value per class")])
def test_focal_rejects_bad_options(kwargs, said):
    with pytest.raises(ValueError, match=said):  # ours, not an error of torch's further on
        FocalLoss(**kwargs)


def test_bad_targets_are_rejected(batch):
    logits, hard, soft = batch
    with pytest.raises(ValueError, match="soft targets have"):
        FocalLoss()(logits, soft[:, :3])
    with pytest.raises(ValueError, match="class indices"):
        FocalLoss()(logits, hard.float())
    with pytest.raises(ValueError, match="per-class vector"):
        FocalLoss(weight=[1.0, 2.0])(logits, hard)


def test_target_distribution():
    t = target_distribution(torch.tensor([1, 0]), 4, label_smoothing=0.2)
    torch.testing.assert_close(t, torch.tensor([[0.05, 0.85, 0.05, 0.05], [0.85, 0.05, 0.05, 0.05]]))
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_class_weights_inverse_frequency():
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2 + [3] * 2)  # class 4 absent
    w = class_weights(labels, 5)
    # raw 1/8, 1/4, 1/2, 1/2; n / (classes present * count): scikit-learn's "balanced"
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 2.0, 2.0, 0.0]))
    assert (w[labels]).mean().item() == pytest.approx(1.0)  # 1 on average over the samples
    sqrt = class_weights(labels.tolist(), 5, power=0.5)
    assert sqrt[0] < sqrt[1] < sqrt[2] == sqrt[3] and sqrt[4] == 0
    assert sqrt[2] / sqrt[0] == pytest.approx(2.0) and sqrt[labels].mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(class_weights(labels, 5, power=0.0), torch.tensor([1.0, 1, 1, 1, 0]))


def test_class_weights_are_scikit_learns_balanced_weights():
    compute_class_weight = pytest.importorskip("sklearn.utils.class_weight").compute_class_weight  # nncf needs it
    labels = np.array([0] * 1000 + [1] * 100 + [2] * 10)
    ours = class_weights(torch.from_numpy(labels), 3).numpy()
    np.testing.assert_allclose(ours, compute_class_weight("balanced", classes=np.arange(3), y=labels), rtol=1e-6)


def test_weighted_losses_on_one_hot_soft_targets_equal_hard_ones():
    """Mixup/CutMix hand every loss soft targets (one-hot rows where a batch is not mixed): with the weights
    averaging 1 over the classes, the soft-target loss of an imbalanced batch was ~14x below the hard one's."""
    labels = torch.tensor([0] * 1000 + [1] * 100 + [2] * 10)
    batch = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:64]]
    logits = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    loss = build_loss("ce", label_smoothing=0.0, weight=class_weights(labels, 3))
    hard, soft = loss(logits, batch), loss(logits, torch.nn.functional.one_hot(batch, 3).float())
    assert 0.5 < (soft / hard).item() < 2.0, (hard, soft)


def test_class_weights_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        class_weights([0, 3], 3)
    torch.testing.assert_close(class_weights([], 2), torch.zeros(2))


def test_build_loss(batch):
    logits, hard, soft = batch
    ce = build_loss("ce", label_smoothing=0.1, weight=[1.0, 2.0, 1.0, 1.0, 1.0])
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.label_smoothing == 0.1 and ce.weight[1] == 2.0
    assert torch.isfinite(ce(logits, soft))
    focal = build_loss("focal", gamma=1.0, alpha=0.5)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.0 and focal.alpha_scalar == 0.5
    assert torch.isfinite(focal(logits, hard))
    with pytest.raises(ValueError, match="alpha is a focal"):
        build_loss("ce", alpha=0.25)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")
