"""inference.responses: the ranking of an answer (equal scores in index order, whatever k the batch asks) and
the rows no answer can be built from."""
from __future__ import annotations

import torch

from inference.responses import top_classes, unanswerable_rows


def test_equal_scores_rank_in_index_order_whatever_k_the_batch_asks():
    """torch.topk orders ties by k: over 1000 tied classes its first two for k=1000 are not those for k=2, so a
    neighbour's X-Top-K changed this request's answer."""
    scores = torch.zeros(2, 1000).softmax(1)
    scores[1, 500] = 1.0
    prefixes = {tuple(top_classes(scores, k)[1][0, :2].tolist()) for k in (2, 5, 100, 1000)}
    assert prefixes == {(0, 1)}
    values, indices = top_classes(scores, 3)
    assert indices[1].tolist() == [500, 0, 1] and values.shape == (2, 3)
    assert torch.equal(top_classes(scores, 1000)[1][0], torch.arange(1000))


def test_rows_with_non_finite_scores_or_unknown_classes_are_named():
    values = torch.tensor([[0.9, 0.1], [float("nan"), 0.5], [0.7, 0.2], [float("inf"), 0.0]])
    indices = torch.tensor([[0, 1], [1, 0], [0, 7], [0, 1]])
    bad = unanswerable_rows(values, indices, classes=2)
    assert sorted(bad) == [1, 2, 3] and "not finite" in bad[1] and "beyond the archive's 2 class names" in bad[2]
    assert unanswerable_rows(values[:1], indices[:1], classes=2) == {}
