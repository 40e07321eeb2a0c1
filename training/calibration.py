"""Calibration of a classifier's confidences: how far its top-1 probability is from how often it is right.

``calibration_metrics`` gives the negative log-likelihood of the true class and the expected calibration error
(ECE, Guo et al. 2017: the top-1 confidences in ``bins`` equal-width bins over [0, 1], the images-weighted mean of
|accuracy - mean confidence| per bin) with the bins themselves; ``plot_reliability`` draws them (accuracy per
confidence bin against the diagonal). Adaptive TTA triggers on a confidence threshold and clients read the
``confidence`` of each answer: both mean what they say only as far as the model is calibrated.
"""
from __future__ import annotations

import torch

from .reports import _figure, _save, nll

DEFAULT_BINS = 15


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor, *, bins: int = DEFAULT_BINS) -> dict:
    """``{"nll", "ece", "calibration": [{"low", "high", "images", "accuracy", "confidence"}]}`` of ``(N, K)``
    probabilities (rows summing to 1) and ``(N,)`` labels; a bin without images is listed with None values. A
    confidence of exactly 0 falls in the first bin, of 1 in the last."""
    probs, labels = torch.as_tensor(probs).double(), torch.as_tensor(labels).long().flatten()
    if probs.dim() != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N={len(labels)}, K), got {tuple(probs.shape)}")
    if len(labels) and (probs.min() < 0 or probs.max() > 1 or not torch.allclose(probs.sum(1), torch.ones(1,
                                                                                  dtype=probs.dtype), atol=1e-3)):
        raise ValueError("calibration needs probabilities (each row in [0, 1], summing to 1), not logits")
    confidence, pred = probs.max(1)
    correct = (pred == labels).double()
    which = (confidence * bins).long().clamp(0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        acc = correct[inside].mean().item() if n else None
        conf = confidence[inside].mean().item() if n else None
        if n:
            ece += n / len(labels) * abs(acc - conf)
        table.append({"low": b / bins, "high": (b + 1) / bins, "images": n, "accuracy": acc, "confidence": conf})
    return {"nll": nll(probs, labels) if len(labels) else 0.0, "ece": ece, "calibration": table}


def plot_reliability(metrics: dict, path) -> str:
    """The reliability diagram of :func:`calibration_metrics`' bins: accuracy per confidence bin as bars, the
    bins' mean confidence as dots, the diagonal of a perfectly calibrated model; the ECE in the title."""
    table = metrics["calibration"]
    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot()
    width = table[0]["high"] - table[0]["low"]
    filled = [b for b in table if b["images"]]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           color="tab:blue", edgecolor="white", label="accuracy")
    ax.plot([b["confidence"] for b in filled], [b["confidence"] for b in filled], "o", color="tab:red",
            markersize=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, ECE {metrics['ece']:.2%} ({len(table)} bins), NLL {metrics['nll']:.3f}")
    ax.legend(loc="upper left")
    return _save(fig, path)
