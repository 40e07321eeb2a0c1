"""inference.batch: one request's failure while stacking or in the model never reaches another request."""
import torch

from inference.batch import Batch, predict_per_request, stack_images
from inference.requests import RequestError


def _images(sizes: dict[int, int]) -> list[tuple[torch.Tensor, int]]:
    return [(torch.full((3, 4, 4), owner, dtype=torch.uint8), owner) for owner, n in sizes.items() for _ in range(n)]


def test_one_stack_when_it_fits():
    errors = {}
    canvas, owners = stack_images(_images({0: 2, 3: 1}), errors)
    assert canvas.shape == (3, 3, 4, 4) and owners == [0, 0, 3] and errors == {}


def test_a_failed_stack_then_join_fails_the_largest_request_only(monkeypatch):
    """The batch's stack fails (out of memory, say); each request stacks alone; joining them fails while the
    largest is in (it needed the memory the stack lacked): it gets its 500, the others are answered."""
    stack, cat = torch.stack, torch.cat

    def flaky_stack(tensors, *args, **kwargs):
        if len(tensors) > 3:
            raise RuntimeError("simulated out of memory while stacking")
        return stack(tensors, *args, **kwargs)

    def flaky_cat(tensors, *args, **kwargs):
        if sum(len(t) for t in tensors) > 3:
            raise RuntimeError("simulated out of memory while joining")
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "stack", flaky_stack)
    monkeypatch.setattr(torch, "cat", flaky_cat)
    errors = {}
    canvas, owners = stack_images(_images({0: 1, 1: 3, 2: 2}), errors)
    assert owners == [0, 2, 2] and canvas[:, 0, 0, 0].tolist() == [0, 2, 2]
    assert list(errors) == [1] and isinstance(errors[1], RequestError) and errors[1].status == 500
    assert "RuntimeError: out of memory" in str(errors[1]) and "while joining" not in str(errors[1])  # log only


def test_nothing_left_is_an_empty_batch_not_an_exception(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no memory at all")

    monkeypatch.setattr(torch, "stack", broken)
    errors = {}
    assert stack_images(_images({0: 1, 1: 1}), errors) == (None, [])
    assert sorted(errors) == [0, 1]


def _batch(sizes: dict[int, int]) -> Batch:
    canvas, owners = stack_images(_images(sizes), {})
    return Batch(size=len(sizes), canvas=canvas, owners=owners)


def _top1(canvas):  # (values, indices, tta applied) as the handler's predict returns them: class = owner
    rows = canvas[:, 0, 0, 0].long()
    return torch.ones(len(rows), 1), rows[:, None], torch.zeros(len(rows), dtype=torch.bool)


def test_the_model_runs_once_when_it_can():
    batch, calls = _batch({0: 2, 3: 1}), []
    predict_per_request(lambda c: calls.append(len(c)) or _top1(c), batch)
    assert calls == [3] and batch.indices[:, 0].tolist() == [0, 0, 3] and batch.failure is None and not batch.errors


def test_a_failed_batch_is_retried_request_by_request_and_only_the_failing_one_gets_500():
    batch, calls = _batch({0: 1, 1: 3, 2: 2}), []

    def fn(canvas):
        calls.append(len(canvas))
        if len(canvas) >= 3:
            raise RuntimeError("out of memory")
        return _top1(canvas)
    predict_per_request(fn, batch)
    assert calls == [6, 1, 3, 2]
    assert list(batch.errors) == [1] and batch.errors[1].status == 500 and "out of memory" in str(batch.errors[1])
    assert batch.owners == [0, 2, 2] and batch.indices[:, 0].tolist() == [0, 2, 2] and len(batch.canvas) == 3
    assert batch.failure is None


def test_a_model_that_fails_for_everyone_fails_the_batch_once_per_request():
    def broken(canvas):
        raise RuntimeError("broken graph")
    for sizes in ({0: 2}, {0: 1, 1: 1}):
        batch = _batch(sizes)
        predict_per_request(broken, batch)
        assert isinstance(batch.failure, RuntimeError) and batch.values is None
