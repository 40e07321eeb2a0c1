"""The training loop end to end on tiny generated data: config/YAML, recipe options, EMA, resume,
early stopping, DDP under torchrun (gloo, 2 processes) against one process."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO, TINY_KWARGS
from training.__main__ import main
from training.config import TrainConfig

NO_DROPOUT = {**TINY_KWARGS, "drop_rate": 0.0}


def _train(image_folder, out, *extra: str) -> None:
    assert main(["train", "--data", str(image_folder), "--model-kwargs", json.dumps(TINY_KWARGS), "--input-size", "16",
                 "--batch-size", "16", "--no-progress", "--out", str(out), *extra]) == 0


def _run_group(cmd: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run in a process group of its own, so a hang kills torchrun's worker processes too."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _log(run) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def test_config_yaml_and_cli_precedence(tmp_path):
    import argparse

    from training.config import add_arguments, from_args
    (tmp_path / "c.yaml").write_text("data: d\nout: o\nepochs: 7\nlr: 0.01\nmixup_alpha: 0.2\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = from_args(p.parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.5", "--no-cache"]))
    assert (cfg.epochs, cfg.lr, cfg.mixup_alpha, cfg.cache, cfg.batch_size) == (7, 0.5, 0.2, False, 128)
    with pytest.raises(ValueError, match="unknown option"):
        (tmp_path / "bad.yaml").write_text("data: d\nout: o\nepochz: 3\n")
        from_args(p.parse_args(["--config", str(tmp_path / "bad.yaml")]))
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(data="d", out="o", schedule="linear").validate()
    with pytest.raises(ValueError, match="needs --no-cache"):
        from training.engine import Trainer
        Trainer(TrainConfig(data="d", out=str(tmp_path / "o"), augment="random_resized_crop"))
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice with a usage message
        p.parse_args(["--optimizer", "lion"])


def test_help_lists_every_architecture_and_option(capsys):
    from training.models import list_models
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in list_models():
        assert name in text
    for option in ("--mixup-alpha", "--cutmix-alpha", "--loss", "--focal-gamma", "--weighted-loss", "--ema",
                   "--early-stopping", "--resume", "--schedule", "--unfreeze", "--backbone-lr-scale", "--sync-bn",
                   "--pretrained", "--format", "--normalize", "--balanced-sampler", "--amp", "--channels-last"):
        assert option in text


@pytest.mark.slow
def test_recipe_run_writes_config_log_and_ema_checkpoints(image_folder, tmp_path):
    run = tmp_path / "recipe"
    _train(image_folder, run, "--epochs", "3", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--loss", "focal",
           "--weighted-loss", "--ema", "--ema-decay", "0.9", "--optimizer", "sgd", "--lr", "0.05",
           "--schedule", "cosine_restarts", "--restart-epochs", "1", "--grad-clip", "5", "--color-jitter", "0.2",
           "--rotation", "10", "--random-erase", "0.25")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["mixup_alpha"] == 0.2 and saved["loss"] == "focal" and saved["ema"] is True
    rows = _log(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and all(r["val_top1_ema"] for r in rows)
    best = torch.load(run / "best.pt", weights_only=True)
    last = torch.load(run / "last.pt", weights_only=True)
    assert best["metrics"]["weights"] in ("model", "ema") and "optimizer" not in best  # lean deployable checkpoint
    assert last["ema_state_dict"] is not None and last["config"]["optimizer"] == "sgd"
    # the run repeats from its own config.yaml
    assert main(["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "again"), "--epochs", "1"]) == 0


@pytest.mark.slow
def test_resume_extends_a_finished_run_with_more_epochs_and_a_new_lr(image_folder, tmp_path):
    """(Bit-for-bit resumption with every source of randomness on: tests/training/test_resume.py.)"""
    from training.config import TrainConfig
    from training.engine import Trainer

    def cfg(out, **kw):
        return TrainConfig(**{**dict(data=str(image_folder), out=str(out), model_kwargs=TINY_KWARGS, input_size=16,
                                     batch_size=16, epochs=3, ema=True, ema_decay=0.9, progress=False), **kw})
    part = tmp_path / "part"
    Trainer(cfg(part)).run()
    b = torch.load(part / "last.pt", weights_only=True)
    more = Trainer(cfg(part, resume=str(part / "last.pt"), epochs=4, lr=1e-3))
    assert more.start_epoch == 4
    more.run()
    assert [int(r["epoch"]) for r in _log(part)] == [1, 2, 3, 4]
    c = torch.load(part / "last.pt", weights_only=True)  # the stretched schedule trained epoch 4 (lr > 0)
    assert c["epoch"] == 4 and not torch.equal(c["state_dict"]["fc.weight"], b["state_dict"]["fc.weight"])
    with pytest.raises(ValueError, match="no training state"):
        Trainer(cfg(tmp_path / "x", resume=str(part / "best.pt")))


@pytest.mark.slow
def test_early_stopping_ends_the_run(image_folder, tmp_path):
    run = tmp_path / "stop"
    _train(image_folder, run, "--epochs", "30", "--lr", "0", "--warmup-epochs", "0", "--schedule", "constant",
           "--early-stopping", "2")  # lr 0: nothing improves after epoch 1
    assert len(_log(run)) == 3


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(image_folder, tmp_path):
    """torchrun, gloo, 2 processes x 8 images per step == 1 process x 16 images per step.

    Exact equality needs per-sample independence: no dropout, no augmentation and no BatchNorm
    (``norm_layer: none``), since SyncBatchNorm exists only on CUDA."""
    kwargs = {**NO_DROPOUT, "norm_layer": "none"}
    common = ["--data", str(image_folder), "--model-kwargs", json.dumps(kwargs), "--input-size", "16",
              "--epochs", "2", "--augment", "none", "--hflip", "0", "--no-progress", "--device", "cpu",
              "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = _run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "training", "train", *common, "--batch-size", "8", "--out", str(tmp_path / "ddp")], env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _run_group([sys.executable, "-m", "training", "train", *common, "--batch-size", "16", "--out",
                         str(tmp_path / "one")], env)
    assert single.returncode == 0, single.stderr[-3000:]
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in a["state_dict"])  # saved from the bare module, rank 0 only
    for k, v in b["state_dict"].items():
        assert torch.allclose(a["state_dict"][k].float(), v.float(), atol=2e-4, rtol=1e-3), k
    assert [r["epoch"] for r in _log(tmp_path / "ddp")] == ["1", "2"]


@pytest.mark.slow
def test_ddp_with_progressive_unfreezing_keeps_the_processes_in_step(image_folder, tmp_path):
    """DDP averages the gradients of the parameters that needed them when it was built: a stage unfrozen
    later used to train on each process's own gradients, the copies drifting apart while rank 0 saved its
    own. The engine builds DDP again on unfreezing, and checks every epoch that the copies agree."""
    kwargs = {"layers": [1, 1, 1, 1], "width_per_group": 8, "hidden": [16], "drop_rate": 0.0}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = _run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "training", "train", "--data", str(image_folder), "--arch", "resnet50_attention",
                      "--model-kwargs", json.dumps(kwargs), "--input-size", "16", "--epochs", "2",
                      "--batch-size", "8", "--unfreeze", "0:,1:layer4", "--no-progress", "--device", "cpu",
                      "--out", str(tmp_path / "run")], env)
    assert run.returncode == 0, run.stderr[-3000:]  # before: "the 2 processes' copies of the model differ"
    assert "unfroze layer4" in run.stdout + run.stderr


@pytest.mark.slow
def test_ddp_rank_0_failing_alone_ends_the_run_with_its_error(image_folder, tmp_path):
    """Rank 0 failed in a step of its own (here writing RUN/config.yaml, which is a folder) and then waited at
    the closing barrier while rank 1 waited in the epoch's collectives: both hung, nothing printed, until killed."""
    out = tmp_path / "run"
    (out / "config.yaml").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = _run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "training", "train", "--data", str(image_folder), "--model-kwargs", json.dumps(TINY_KWARGS),
                      "--input-size", "16", "--epochs", "1", "--batch-size", "8", "--no-progress", "--device", "cpu",
                      "--out", str(out)], env, timeout=150)
    assert run.returncode not in (0, -signal.SIGKILL), run.stderr[-3000:]  # -9: the timeout killed a hang
    assert f"error: {out / 'config.yaml'}: is a folder, where a file is to be written" in run.stderr, run.stderr[-3000:]


def test_a_process_whose_copy_drifted_is_an_error():
    """check_in_step in a gloo process group of two spawned processes: one copy nudged by 1e-6 is found."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = str(_free_port())
    procs = [ctx.Process(target=_drift_worker, args=(rank, port)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drift_worker(rank: int, port: str) -> None:
    import torch.distributed as dist

    from training.distributed import DistInfo, check_in_step
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    check_in_step(model, info)  # the same copies: nothing raised
    if rank == 1:
        with torch.no_grad():
            model[1].weight.add_(1e-6)
    try:
        check_in_step(model, info)
        raise SystemExit(3)
    except RuntimeError as e:
        assert "differ in 1 parameters" in str(e) and "1.weight" in str(e), e
    dist.destroy_process_group()


def test_ema_decay_warms_up():
    from training.engine import ema_avg_fn
    avg = ema_avg_fn(0.999)
    a, c = torch.zeros(3), torch.ones(3)
    assert torch.allclose(avg(a, c, torch.tensor(0)), torch.full((3,), 0.9))    # decay (1+0)/(10+0) = 0.1
    assert torch.allclose(avg(a, c, torch.tensor(10**6)), torch.full((3,), 0.001), atol=1e-6)  # capped at 0.999


@pytest.mark.slow
def test_fine_tuning_a_backbone_model_with_local_weights(image_folder, tmp_path, capsys):
    """resnet50_attention (shrunk): local torchvision-style weights, head-only first epoch, then layer4
    unfrozen at a tenth of the head's learning rate; layer1 stays frozen and keeps the loaded weights."""
    from training.models import build_model
    kwargs = {"layers": [1, 1, 1, 1], "width_per_group": 16}
    donor = build_model("resnet50_attention", num_classes=3, **kwargs).backbone.state_dict()
    torch.save(donor, tmp_path / "backbone.pth")
    run = tmp_path / "ft"
    assert main(["train", "--data", str(image_folder), "--arch", "resnet50_attention", "--model-kwargs",
                 json.dumps(kwargs), "--input-size", "32", "--batch-size", "16", "--epochs", "2", "--no-progress",
                 "--pretrained", str(tmp_path / "backbone.pth"), "--unfreeze", "0:,1:layer4",
                 "--backbone-lr-scale", "0.1", "--balanced-sampler", "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "pretrained weights from" in printed and "unfroze layer4" in printed
    state = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    assert torch.equal(state["backbone.layer1.0.conv1.weight"], donor["layer1.0.conv1.weight"])  # frozen, loaded
    assert not torch.equal(state["backbone.layer4.0.conv1.weight"], donor["layer4.0.conv1.weight"])  # trained


def test_tensorboard_gets_every_epoch_scalar_of_log_csv(image_folder, tmp_path):
    """--tensorboard writes the epoch scalars, read back with TensorBoard's own reader (a dev dependency)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.engine import Trainer
    from training.reports import read_log
    cfg = TrainConfig(data=str(image_folder), out=str(tmp_path / "tb"), model_kwargs=TINY_KWARGS, input_size=16,
                      batch_size=16, epochs=2, tensorboard=True, progress=False)
    Trainer(cfg).run()
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    log = read_log(tmp_path / "tb" / "log.csv")
    assert {"train_loss", "val_loss", "val_top1", "lr"} <= set(events.Tags()["scalars"])
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        assert [p.step for p in points] == [1, 2], tag
        assert [p.value for p in points] == pytest.approx(log[tag], rel=1e-4, abs=1e-5), tag  # log.csv rounds


def test_tensorboard_without_its_package_is_a_clear_error(image_folder, tmp_path, monkeypatch):
    import importlib.util
    import sys

    from training.engine import Trainer
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails as without the package
    cfg = TrainConfig(data=str(image_folder), out=str(tmp_path / "tb"), model_kwargs=TINY_KWARGS, input_size=16,
                      batch_size=16, epochs=1, tensorboard=True, progress=False)
    with pytest.raises(ValueError, match="needs the tensorboard package"):  # refused by the configuration
        cfg.validate()
    monkeypatch.setattr(TrainConfig, "validate", lambda self: None)
    with pytest.raises(ValueError, match="needs the tensorboard package"):  # and by the writer itself
        Trainer(cfg).run()
    assert not (tmp_path / "tb" / "tensorboard").exists()


@pytest.mark.parametrize("start", ["forkserver", "fork"])
def test_dataloader_workers_start_from_a_fork_server_unless_told(image_folder, tmp_path, start):
    """--worker-start forkserver (the default): workers are not forks of the training process, whose other
    threads may hold locks (the test process's gRPC, ONNX Runtime and OpenVINO pools); --worker-start fork
    keeps the old way."""
    import psutil

    from training.engine import Trainer

    cfg = TrainConfig(data=str(image_folder), out=str(tmp_path / "run"), model_kwargs=TINY_KWARGS, input_size=16,
                      batch_size=8, epochs=1, workers=2, cache=False, progress=False, worker_start=start)
    assert TrainConfig().worker_start == "forkserver"
    batches = iter(Trainer(cfg.validate()).train_loader)
    try:
        images, labels, _ = next(batches)
        assert images.shape[1:] == (3, 16, 16) and len(labels) == len(images)
        parents = {psutil.Process(w.pid).ppid() for w in batches._workers}  # private, the only handle on them
        assert len(batches._workers) == 2 and len(parents) == 1  # one fork server, or this process
        assert (parents == {os.getpid()}) == (start == "fork")
    finally:
        batches._shutdown_workers()
