"""Threads that follow the model's live workers, the handler's metrics and their metrics.yaml, the model
card for ``describe``, and a missing graph fact at start-up (no TorchServe here; that is
tests/integration/test_operations.py)."""
import json
import logging
import os
import shutil

import pytest
import torch
import yaml

from inference.batch import Batch
from inference.cli import UsageError
from inference.metrics import METRICS, batch_metrics, dimensions
from inference.settings import HandlerSettings, SettingsError
from inference.threads import Change, WorkerThreads, live_workers
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Counts:
    """A fake worker count and clock: ``counts`` is what each call of the counter returns."""

    def __init__(self, *counts):
        self.counts, self.calls, self.now = list(counts), 0, 0.0

    def __call__(self, model_dir):
        self.calls += 1
        return self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]

    def clock(self):
        return self.now


def tracker(counts: Counts, **kw) -> WorkerThreads:
    return WorkerThreads(model_dir="/m", interval=2.0, cores=8, env={}, counter=counts, clock=counts.clock, **kw)


def test_threads_are_resized_when_two_counts_in_a_row_agree():
    counts = Counts(1, 2, 2, 2, 1, 1)
    rebuilt = []
    t = tracker(counts)
    t.rebuild = rebuilt.append
    assert (t.workers, t.threads, torch.get_num_threads(), t.pool._max_workers) == (1, 8, 8, 8)
    counts.now = 1.0
    assert t.follow() is None and counts.calls == 1  # rate-limited: not counted before the interval
    counts.now = 2.0
    assert t.follow() is None and t.threads == 8  # the first count of 2: not yet acted on
    counts.now = 4.0
    assert t.follow() == Change(workers_before=1, workers=2, threads_before=8, threads=4)
    assert (t.threads, torch.get_num_threads(), t.pool._max_workers, rebuilt) == (4, 4, 4, [4])
    counts.now = 6.0
    assert t.follow() is None  # still 2
    counts.now = 8.0
    assert t.follow() is None and t.threads == 4  # a first 1 (a worker restarting?) ...
    counts.now = 10.0
    assert t.follow().threads == 8 and rebuilt == [4, 8]  # ... confirmed: back to all cores


def test_a_count_that_flickers_changes_nothing():
    counts = Counts(2, 3, 2, 3, 2)
    t = tracker(counts)
    for now in (2.0, 4.0, 6.0, 8.0):
        counts.now = now
        assert t.follow() is None
    assert (t.workers, t.threads) == (2, 4)


def test_fixed_threads_are_kept_and_oversubscription_is_logged(caplog):
    caplog.set_level(logging.WARNING, logger="inference.threads")
    counts = Counts(2, 4, 4)
    t = tracker(counts, configured=3, name="m")
    assert t.threads == 3 and not caplog.records  # 2 x 3 <= 8
    counts.now = 2.0
    assert t.follow() is None
    counts.now = 4.0
    change = t.follow()
    assert change == Change(2, 4, 3, 3) and t.threads == 3 and t.oversubscribed
    assert "m: 4 live workers x 3 threads (fixed by model-config.yaml threads or OMP_NUM_THREADS) > 8 cores" \
        in caplog.text
    omp = WorkerThreads(model_dir="/m", cores=2, env={"OMP_NUM_THREADS": "2"}, counter=Counts(2))
    assert omp.threads == 2 and omp.oversubscribed


def test_without_a_count_the_archives_worker_count_is_used():
    t = WorkerThreads(workers=2, model_dir="/m", cores=8, env={}, counter=lambda d: 0)
    assert (t.workers, t.threads) == (2, 4)
    assert WorkerThreads(workers=3, model_dir="/m", interval=0, cores=8, env={}, counter=lambda d: 1).check() is None


def _proc(root, pid, *, ppid, cwd, cmd, state="S"):
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_bytes(f"{pid} (py thon)) {state} {ppid} 1 1 0".encode())
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmd))
    os.symlink(cwd, d / "cwd")


def test_live_workers_are_the_frontends_children_serving_this_model_dir(tmp_path):
    proc, model, other = tmp_path / "proc", tmp_path / "model", tmp_path / "other"
    for d in (proc, model, other):
        d.mkdir()
    worker = ["python", "/venv/ts/model_service_worker.py", "--sock-type", "unix"]
    _proc(proc, 10, ppid=7, cwd=model, cmd=worker)
    _proc(proc, 11, ppid=7, cwd=model, cmd=worker)
    _proc(proc, 12, ppid=7, cwd=other, cmd=worker)                # another model
    _proc(proc, 13, ppid=7, cwd=model, cmd=worker, state="Z")     # ended, not yet reaped
    _proc(proc, 14, ppid=8, cwd=model, cmd=worker)                # another TorchServe
    _proc(proc, 15, ppid=7, cwd=model, cmd=["python", "x.py"])    # not a worker
    (proc / "16").mkdir()                                         # ended while read
    (proc / "self").mkdir()
    assert live_workers(str(model), parent=7, proc=str(proc)) == 2
    assert live_workers(str(other), parent=7, proc=str(proc)) == 1
    assert live_workers(str(model), parent=7, proc=str(tmp_path / "none")) == 0
    assert live_workers(os.getcwd()) == 0  # pytest is no TorchServe worker


def test_metrics_yaml_declares_the_handlers_metrics_and_keeps_torchserves():
    ts = pytest.importorskip("ts")
    ours = yaml.safe_load((REPO / "metrics.yaml").read_text())
    default = yaml.safe_load(open(os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml")))
    assert ours["ts_metrics"] == default["ts_metrics"] and ours["dimensions"] == default["dimensions"]
    declared = {m["name"]: (kind, m["unit"], tuple(m["dimensions"]))
                for kind, entries in ours["model_metrics"].items() for m in entries}
    for kind, entries in default["model_metrics"].items():  # TorchServe's own (HandlerTime, PredictionTime)
        for m in entries:
            assert declared.pop(m["name"]) == (kind, m["unit"], tuple(m["dimensions"]))
    assert declared == {name: (kind, unit, dimensions(name)) for name, (kind, unit, _) in METRICS.items()}
    assert dimensions("RequestErrorsTotal") == ("ModelName", "Level", "Status")
    for config in ("config.properties", "config.prod.properties"):
        assert "metrics_config=metrics.yaml" in (REPO / config).read_text().splitlines(), config


def test_torchserve_is_given_the_repositorys_metrics_yaml():
    from tools.torchserve import TorchServe
    ts = TorchServe()
    try:
        assert ts.props["metrics_config"] == str(REPO / "metrics.yaml")
        assert f"metrics_config={REPO / 'metrics.yaml'}" in ts.config_path.read_text().splitlines()
    finally:
        shutil.rmtree(ts.workdir)


def test_batch_metrics_are_seconds_for_histograms_and_ms_for_gauges():
    batch = Batch(size=3, owners=[0, 0, 2], tta_applied=torch.tensor([True, False, False]),
                  timings={"decode": 12.5, "preprocess": 0.25, "forward": 1500.0})
    values = {name: value for name, value, _ in batch_metrics(batch, views=2, adaptive=True, threads=4, workers=2)}
    assert values == {"DecodeSeconds": 0.0125, "DecodeMs": 12.5, "PreprocessSeconds": 0.00025, "PreprocessMs": 0.25,
                      "ForwardSeconds": 1.5, "ForwardMs": 1500.0, "BatchSize": 3, "WorkerThreads": 4,
                      "LiveWorkers": 2, "TTAViewsPerImage": round(4 / 3, 3), "AdaptiveTTATriggerRate": 33.33,
                      "ImagesTotal": 3, "TTAImagesTotal": 1, "ForwardViewsTotal": 4}
    assert set(values) <= set(METRICS)
    assert {METRICS[n][0] for n in values if n.endswith("Seconds")} == {"histogram"}
    assert {METRICS[n][0] for n in values if n.endswith("Total")} == {"counter"}


def test_counters_add_up_what_the_gauges_overwrite_and_a_failed_forward_counts_as_errors():
    """The gauges are one worker's last batch: a rate or a ratio over time needs counters. A batch whose forward
    failed reported a trigger rate of 0 and 1 view per image, as if the model had answered without TTA."""
    plain = Batch(size=2, owners=[0, 1, 1], tta_applied=torch.tensor([True, True, True]))
    values = {n: v for n, v, _ in batch_metrics(plain, views=10, adaptive=False, threads=1, workers=1)}
    assert (values["ImagesTotal"], values["TTAImagesTotal"], values["ForwardViewsTotal"]) == (3, 3, 30)
    failed = Batch(size=3, owners=[0, 1, 2], failure=RuntimeError("out of memory"), timings={"forward": 5.0})
    out = batch_metrics(failed, views=2, adaptive=True, threads=1, workers=1, error_statuses=[500, 500, 500])
    names = {n for n, _, _ in out}
    assert not names & {"TTAViewsPerImage", "AdaptiveTTATriggerRate", "ImagesTotal", "TTAImagesTotal"}
    assert ("RequestErrorsTotal", 3, ("500",)) in out and "ForwardSeconds" in names  # the time was spent
    mixed = batch_metrics(Batch(size=3), views=1, adaptive=False, threads=1, workers=1, error_statuses=[503, 413, 503])
    assert [e for e in mixed if e[0] == "RequestErrorsTotal"] == [("RequestErrorsTotal", 1, ("413",)),
                                                                  ("RequestErrorsTotal", 2, ("503",))]


def test_a_missing_graph_fact_names_the_key():
    for section in (None, {}, {"topk": 3}):  # no handler section, or one written by hand without input_size
        with pytest.raises(SettingsError, match=r"^model-config.yaml handler.input_size is required \(the graph's "
                           r"input size in pixels; `python -m export archive` writes it\)$") as e:
            HandlerSettings.from_config(section)
        assert isinstance(e.value, UsageError) and isinstance(e.value, ValueError)


def test_describe_answers_the_archives_model_card(tmp_path):
    from ts.context import Context

    from handlers.classifier_handler import ImageClassifierHandler
    h = ImageClassifierHandler()
    h.context = Context("m", str(tmp_path), {"model": {"modelName": "m"}}, 1, None, "0.12.0")
    assert "no model_card.json" in json.loads(h.describe_handle())["error"]
    card = {"name": "m", "checkpoint_sha256": "ab" * 32, "handler": {"input_size": 24}}
    (tmp_path / "model_card.json").write_text(json.dumps(card, indent=1))
    assert json.loads(h.describe_handle()) == card


def test_a_runtime_that_cannot_be_re_created_keeps_its_threads_and_its_count():
    """The count (and the WorkerThreads metric) said the new threads while the old session kept its own."""
    counts = Counts(1, 2, 2)
    t = tracker(counts)

    def fails(threads):
        raise MemoryError("simulated: no memory for a second session")
    t.rebuild = fails
    pool = t.pool
    for now in (2.0, 4.0):
        counts.now = now
        change = t.follow()
    assert change == Change(workers_before=1, workers=2, threads_before=8, threads=8)
    assert (t.workers, t.threads, torch.get_num_threads(), t.pool) == (2, 8, 8, pool)
