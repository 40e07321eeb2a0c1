"""Evaluation reports: metrics (computed with torch), a text report, PNG plots and a predictions CSV.

Plots use matplotlib's Agg canvas on a bare ``Figure`` (no pyplot, no global backend switch), so
they work headless and from any thread.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from typing import Sequence

import torch

from inference.atomic import replacing, write_bytes

# ----------------------------------------------------------------------------------------- metrics


def ranked(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of each row's ``k`` highest scores, ties broken toward the lower class index,
    as ``argmax`` does (``torch.topk`` breaks them arbitrarily): top-1 accuracy, the confusion matrix and the
    predictions CSV then name the same class."""
    order = probs.argsort(dim=1, descending=True, stable=True)[:, :k]
    return probs.gather(1, order), order


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (``k`` capped at the class count; ties
    toward the lower index, see :func:`ranked`)."""
    if len(labels) == 0:
        return 0.0
    k = max(1, min(k, probs.shape[1]))
    return (ranked(probs, k)[1] == labels[:, None]).any(1).float().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (the plain cross-entropy of the predictions)."""
    return -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` int64 counts; rows are the true class, columns the predicted one."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


#: Classes up to which metrics.json holds the whole confusion matrix (and evaluate draws it): 1000 classes are 1M
#: cells, a few MB; iNat's 10,000 would be 100M (hundreds of MB of JSON, GBs of RAM to write it). Above, only its
#: non-zero cells (at most one per image) are kept, as ``confusion_cells``.
DENSE_CONFUSION_MAX = 1000
MOST_CONFUSED = 20  # the off-diagonal cells listed as "most_confused"


def confusion_cells(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """The confusion matrix's non-zero cells as ``[true, predicted, images]``, in O(images) memory."""
    keys, counts = torch.unique(labels.long() * num_classes + pred.long(), return_counts=True)
    return torch.stack([keys // num_classes, keys % num_classes, counts], 1).tolist()


def most_confused(cells: list[list[int]], class_names: Sequence[str], n: int = MOST_CONFUSED) -> list[dict]:
    """The ``n`` off-diagonal cells with the most images (ties by true, then predicted class index)."""
    off = sorted((c for c in cells if c[0] != c[1]), key=lambda c: (-c[2], c[0], c[1]))[:n]
    return [{"true": str(class_names[t]), "predicted": str(class_names[p]), "images": k} for t, p, k in off]


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (no nan, no warning)."""
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Top-1/3/5, macro precision/recall/F1, per-class metrics and the confusion matrix.

    ``probs``: ``(N, K)`` scores (probabilities or logits), ``labels``: ``(N,)`` class indices.
    Returns plain Python numbers and lists (JSON-ready)::

        {"top1", "top3", "top5", "macro_precision", "macro_recall", "macro_f1",
         "per_class": {name: {"precision", "recall", "f1", "accuracy", "support"}},
         "confusion": [[int]] (rows true, columns predicted; above DENSE_CONFUSION_MAX classes
         "confusion_cells": [[true, predicted, images]], its non-zero cells), "most_confused":
         [{"true", "predicted", "images"}] (the largest off-diagonal cells), "images": N}

    A zero division gives 0. Like scikit-learn, the macro averages are over the classes that occur
    among the labels or the predictions (a class absent from both would only add a meaningless 0).
    Per-class ``accuracy`` is the recall: the fraction of that class's images classified correctly.
    """
    probs, labels = torch.as_tensor(probs), torch.as_tensor(labels).long().flatten()
    num_classes = len(class_names)
    if probs.dim() != 2 or probs.shape[1] != num_classes or probs.shape[0] != len(labels):
        raise ValueError(f"probs must be (N={len(labels)}, K={num_classes}), got {tuple(probs.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    pred = probs.argmax(1)
    support = torch.bincount(labels, minlength=num_classes).double()
    predicted = torch.bincount(pred, minlength=num_classes).double()
    tp = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    macro = lambda v: v[present].mean().item() if present.any() else 0.0  # noqa: E731
    per_class = {name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                        "accuracy": recall[i].item(), "support": int(support[i].item())}
                 for i, name in enumerate(distinct_names(class_names))}
    cells = confusion_cells(pred, labels, num_classes)
    confusion = ({"confusion": confusion_matrix(pred, labels, num_classes).tolist()}
                 if num_classes <= DENSE_CONFUSION_MAX else {"confusion_cells": cells})
    return {"top1": topk_accuracy(probs, labels, 1), "top3": topk_accuracy(probs, labels, 3),
            "top5": topk_accuracy(probs, labels, 5), "macro_precision": macro(precision),
            "macro_recall": macro(recall), "macro_f1": macro(f1), "per_class": per_class, **confusion,
            "most_confused": most_confused(cells, distinct_names(class_names)), "images": len(labels)}


def distinct_names(class_names) -> list[str]:
    """The class names, each one that repeats an earlier one suffixed with its index (``"Aster [7]"``): keyed by
    name, two classes of one display name (class_names.json, an iNat common name) merged into one row."""
    counts = Counter(map(str, class_names))
    return [f"{name} [{i}]" if counts[str(name)] > 1 else str(name) for i, name in enumerate(class_names)]


def classification_report(metrics: dict, *, digits: int = 3) -> str:
    """A text table like scikit-learn's ``classification_report`` from :func:`classification_metrics`:
    per-class precision/recall/f1/support, then accuracy (and top-3/top-5), macro and weighted avg."""
    per_class = metrics["per_class"]
    headers = ("precision", "recall", "f1-score", "support")
    rows = ["weighted avg", "top-5 accuracy"]
    width = max(len(str(n)) for n in [*per_class, *rows])
    col = max(len(h) for h in headers) + 1
    num = lambda v: f"{v:>{col}.{digits}f}"  # noqa: E731
    blank = " " * col
    lines = [" " * width + "".join(f"{h:>{col}}" for h in headers), ""]
    for name, m in per_class.items():
        lines.append(f"{name:>{width}}" + num(m["precision"]) + num(m["recall"]) + num(m["f1"])
                     + f"{m['support']:>{col}}")
    lines.append("")
    n = metrics["images"]
    lines.append(f"{'accuracy':>{width}}" + blank + blank + num(metrics["top1"]) + f"{n:>{col}}")
    for k in (3, 5):
        if f"top{k}" in metrics and k < len(per_class):
            lines.append(f"{f'top-{k} accuracy':>{width}}" + blank + blank + num(metrics[f"top{k}"]) + f"{n:>{col}}")
    lines.append(f"{'macro avg':>{width}}" + num(metrics["macro_precision"]) + num(metrics["macro_recall"])
                 + num(metrics["macro_f1"]) + f"{n:>{col}}")
    total = sum(m["support"] for m in per_class.values())
    weighted = [sum(m[key] * m["support"] for m in per_class.values()) / total if total else 0.0
                for key in ("precision", "recall", "f1")]
    lines.append(f"{'weighted avg':>{width}}" + "".join(num(v) for v in weighted) + f"{n:>{col}}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A bare Agg-backed matplotlib Figure (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as f:  # a crash mid-write leaves the earlier plot; the format is the name's, as savefig's
        fig.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=100, bbox_inches="tight")
    return path


def label_layout(num_classes: int) -> tuple[float, int]:
    """``(tick label font size, show every n-th label)`` for an axis of ``num_classes`` labels:
    full size up to 30 classes, shrinking to 7 pt at 100 (the plots give every class at least 0.2
    inch, 14 pt), every n-th label beyond 100."""
    if num_classes <= 30:
        return 9.0, 1
    size = max(7.0, 9.0 - 2.0 * (num_classes - 30) / 70)
    return size, max(1, math.ceil(num_classes / 100))


def plot_confusion_matrix(confusion, class_names: Sequence[str], path, *, normalize: bool = True) -> str:
    """Confusion matrix heat map (rows true, columns predicted), row-normalized by default (a row
    without images stays 0). The figure grows with the class count; labels shrink above 30 classes
    and are thinned above 100; cell values are written up to 20 classes. Returns ``path``."""
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion must be {k}x{k}, got {tuple(cm.shape)}")
    if normalize:
        cm = _safe_div(cm, cm.sum(1, keepdim=True).expand_as(cm))
    side = min(40.0, max(6.0, 3.0 + 0.2 * k))
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(1.0, cm.max().item())
    im = ax.imshow(cm.numpy(), cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class" if normalize else "images")
    size, every = label_layout(k)
    ticks = list(range(0, k, every))
    names = [str(class_names[i]) for i in ticks]
    if k <= 30:
        ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor", fontsize=size)
    else:
        ax.set_xticks(ticks, names, rotation=90, fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix{' (row-normalized)' if normalize else ''}, {k} classes")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = cm[i, j].item()
                text = f"{v:.2f}" if normalize else f"{int(v)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=max(6, 10 - k // 4),
                        color="white" if v > 0.5 * vmax else "black")
    return _save(fig, path)


def plot_per_class_accuracy(metrics: dict, path) -> str:
    """Horizontal bars of per-class accuracy (recall), best at the top, with the overall top-1 as a
    dashed line. Classes without test images are left out. Returns ``path``."""
    items = sorted(((m["accuracy"], name) for name, m in metrics["per_class"].items() if m["support"] > 0),
                   key=lambda t: (-t[0], t[1]))
    k = max(1, len(items))
    fig = _figure(8.0, min(60.0, max(3.0, 1.5 + 0.22 * k)))
    ax = fig.add_subplot()
    acc = [a for a, _ in items]
    names = [str(n) for _, n in items]
    ax.barh(range(len(items)), acc, color="tab:blue", height=0.8)
    size, every = label_layout(len(items))
    ax.set_yticks(list(range(0, len(items), every)), names[::every], fontsize=size)
    ax.set_ylim(len(items) - 0.5, -0.5)  # best on top, no empty margin
    ax.set_xlim(0, 1)
    ax.axvline(metrics["top1"], color="tab:red", linestyle="--", label=f"top-1 {metrics['top1']:.1%}")
    if len(items) <= 30:
        for i, a in enumerate(acc):
            ax.text(min(a + 0.01, 0.9), i, f"{a:.1%}", va="center", fontsize=size)
    ax.set_xlabel("accuracy (recall)")
    ax.set_title(f"Per-class accuracy, {len(items)} classes")
    ax.legend(loc="lower right")
    return _save(fig, path)


def read_log(log_csv) -> dict[str, list[float]]:
    """A run's CSV log as ``{column: [float per row]}``; empty or non-numeric cells become NaN."""
    def number(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    return {c: [number(r.get(c)) for r in rows] for c in columns}


def plot_training_curves(log_csv, path) -> str:
    """Loss, accuracy and learning rate per epoch from a run's CSV log, one panel each.

    Loss panel: every ``*loss*`` column (``train_loss``, ``test_loss``...); accuracy: every
    ``*top1``/``*top5``/``*acc*`` column; lr: ``lr`` (log scale). Missing columns are skipped, as
    are panels without data; the x axis is ``epoch`` or the row number. Returns ``path``.
    """
    from matplotlib.ticker import MaxNLocator
    log = read_log(log_csv)
    rows = len(next(iter(log.values()), []))
    if rows == 0:
        raise ValueError(f"{log_csv} has no rows to plot")
    epochs = log.get("epoch") or list(range(1, rows + 1))
    has_data = lambda c: any(not math.isnan(v) for v in log[c])  # noqa: E731
    panels = [("loss", [c for c in log if "loss" in c and has_data(c)]),
              ("accuracy", [c for c in log if ("top1" in c or "top5" in c or "acc" in c) and has_data(c)]),
              ("learning rate", [c for c in log if (c == "lr" or c.startswith("lr_")) and has_data(c)])]
    panels = [(title, cols) for title, cols in panels if cols]
    if not panels:
        raise ValueError(f"{log_csv} has no loss, accuracy or lr column")
    fig = _figure(5.0 * len(panels), 4.0)
    for i, (title, cols) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in cols:
            ax.plot(epochs, log[c], marker="o" if rows <= 30 else None, markersize=3, label=c)
        if title == "learning rate" and all(v > 0 for c in cols for v in log[c] if not math.isnan(v)):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_csv))) or "training")
    return _save(fig, path)


# ------------------------------------------------------------------------------------- predictions


def write_predictions_csv(path, paths: Sequence[str], labels, probs: torch.Tensor, class_names: Sequence[str], *,
                          topk: int = 1) -> str:
    """One row per image: ``path, label, label_name, pred, pred_name, confidence``.

    ``labels`` may be ``None`` (unlabelled images): ``label`` and ``label_name`` are then empty, as
    for any negative label. ``topk > 1`` adds ``top{i}, top{i}_name, top{i}_confidence`` for
    ``i = 2..k`` (capped at the class count). Returns ``path``.
    """
    probs = torch.as_tensor(probs).float()
    n = probs.shape[0]
    if len(paths) != n or (labels is not None and len(labels) != n):
        raise ValueError(f"{len(paths)} paths, {n} rows of probabilities"
                         + ("" if labels is None else f", {len(labels)} labels"))
    k = max(1, min(topk, probs.shape[1]))
    conf, idx = ranked(probs, k)
    labels = [None] * n if labels is None else torch.as_tensor(labels).tolist()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = ["path", "label", "label_name", "pred", "pred_name", "confidence"]
    for i in range(2, k + 1):
        header += [f"top{i}", f"top{i}_name", f"top{i}_confidence"]
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    for p, y, cs, ps in zip(paths, labels, conf.tolist(), idx.tolist()):
        row = [os.fspath(p), *(("", "") if y is None or y < 0 else (y, class_names[y]))]
        for c, q in zip(cs, ps):
            row += [q, class_names[q], f"{c:.6f}"]
        w.writerow(row)
    write_bytes(path=path, data=text.getvalue().encode("utf-8", "surrogateescape"))  # file names as on disk
    return path
