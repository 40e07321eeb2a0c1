"""training.calibration: ECE and NLL against an independent computation (numpy binning, scikit-learn's log_loss),
and the reliability diagram as a PNG."""
import numpy as np
import pytest
import torch

from training.calibration import calibration_metrics, plot_reliability


def _reference_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE as Guo et al. (2017) define it, written with numpy: bins (low, high], the first one [0, high]."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (conf > low) & (conf <= high) if low > 0 else (conf >= low) & (conf <= high)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


def test_ece_and_nll_agree_with_independent_references():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 7, generator=g) * 3
    probs = logits.double().softmax(1)
    labels = torch.multinomial(probs.float(), 1, generator=g).flatten()  # calibrated by construction, up to noise
    labels[:300] = (labels[:300] + 1) % 7  # ... then made overconfident on 15% of the images
    m = calibration_metrics(probs, labels, bins=10)
    # numpy's bins are (low, high]; ours [low, high): no confidence of these random logits sits on an edge
    assert m["ece"] == pytest.approx(_reference_ece(probs.numpy(), labels.numpy(), 10), abs=1e-9)
    assert m["nll"] == pytest.approx(sklearn_metrics.log_loss(labels.numpy(), probs.numpy(), labels=list(range(7))),
                                     rel=1e-6)
    assert sum(b["images"] for b in m["calibration"]) == 2000 and 0.05 < m["ece"] < 0.5


def test_a_perfectly_confident_and_right_model_has_no_calibration_error_and_logits_are_refused(tmp_path):
    probs = torch.eye(4).repeat(3, 1)
    m = calibration_metrics(probs, torch.arange(4).repeat(3))
    assert m["ece"] == 0.0 and m["calibration"][-1]["images"] == 12 and m["calibration"][0]["accuracy"] is None
    wrong = calibration_metrics(probs, (torch.arange(4).repeat(3) + 1) % 4)
    assert wrong["ece"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs probabilities"):
        calibration_metrics(torch.randn(5, 3) * 4, torch.zeros(5, dtype=torch.long))
    png = plot_reliability(wrong, tmp_path / "r.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
