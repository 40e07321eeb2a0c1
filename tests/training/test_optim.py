import io

import pytest
import torch
from torch import nn

from training.optim import (
    EarlyStopping,
    build_optimizer,
    build_schedule,
    cosine_restarts_factor,
    param_groups,
    split_decay,
    step_decay_factor,
    warmup_factor,
)


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LayerNorm(4 * 4 * 4),
                         nn.Linear(64, 3))


def groups_by_decay(opt):
    return {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}


def run(schedule, opt, epochs, steps_per_epoch, metrics=None):
    """lr used by every batch, stepping like the training loop does."""
    lrs = []
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(schedule.lr)
            opt.step()
            schedule.step_batch()
        schedule.step_epoch(None if metrics is None else metrics[e])
    return lrs


def sgd(lr=1.0, groups=None):
    params = groups or [nn.Parameter(torch.zeros(2))]
    return torch.optim.SGD(params, lr=lr)


def test_split_decay_keeps_norm_and_bias_out():
    m = small_model()
    decay, no_decay = split_decay(m)
    assert [p.shape for p in decay] == [m[0].weight.shape, m[5].weight.shape]
    assert len(no_decay) == 6  # conv bias, bn weight+bias, ln weight+bias, linear bias
    m[0].weight.requires_grad_(False)
    assert len(split_decay(m)[0]) == 1


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_build_optimizer_from_module(name):
    m = small_model()
    opt = build_optimizer(m, name=name, lr=0.1, weight_decay=0.05)
    assert groups_by_decay(opt) == {0.05: 4 * 3 * 9 + 3 * 64, 0.0: 4 + 8 + 128 + 3}
    assert all(g["lr"] == 0.1 for g in opt.param_groups)
    if name == "sgd":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert len(build_optimizer(m, lr=0.1, no_decay_norm_and_bias=False).param_groups) == 1


def test_build_optimizer_param_groups_keep_their_own_lr():
    m = small_model()
    opt = build_optimizer([{"params": m[:5], "lr": 1e-4}, {"params": m[5]}], name="sgd", lr=1e-2, momentum=0.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4, 1e-2, 1e-2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.05, 0.0]
    assert not opt.defaults["nesterov"]  # needs momentum
    opt = build_optimizer([{"params": m[0].parameters(), "lr": 1e-3, "weight_decay": 0.0}, {"params": m[5].weight}],
                          lr=1e-2)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(1e-3, 0.0, 2),
                                                                                         (1e-2, 0.05, 1)]
    assert len(param_groups(m.parameters())) == 1


def test_build_optimizer_errors():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(small_model(), name="lamb", lr=1.0)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.Sequential(nn.Linear(2, 2).requires_grad_(False)), lr=1.0)


def test_factor_functions():
    assert [warmup_factor(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert cosine_restarts_factor(0, period=10) == cosine_restarts_factor(10, period=10) == 1.0
    assert cosine_restarts_factor(10 + 20, period=10, mult=2) == 1.0  # cycles of 10, 20, 40
    assert cosine_restarts_factor(5, period=10, min_ratio=0.2) == pytest.approx(0.6)
    assert [step_decay_factor(s, steps_per_epoch=2, step_epochs=3, gamma=0.5) for s in (0, 5, 6, 12)] == [
        1, 1, 0.5, 0.25]


def test_cosine_with_warmup_shape():
    opt = sgd(lr=2.0)
    sched = build_schedule(opt, name="cosine", epochs=10, steps_per_epoch=10, warmup_epochs=0.5, min_lr_ratio=0.1)
    lrs = run(sched, opt, 10, 10)
    assert lrs[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])  # linear warm-up from ~0, 5 steps
    assert lrs[5] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # monotone decay after warm-up
    assert lrs[-1] == pytest.approx(0.2, abs=0.01) and min(lrs) >= 0.2 - 1e-9
    assert sched.lr == pytest.approx(0.2)


def test_differential_lrs_keep_their_ratio():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    for name in ("cosine", "cosine_restarts", "step", "plateau"):
        opt = torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b]}], lr=1e-3)
        sched = build_schedule(opt, name=name, epochs=6, steps_per_epoch=3, warmup_epochs=1, min_lr_ratio=0.05,
                               restart_epochs=2, step_epochs=2, plateau_patience=0)
        lowest = 1e-3
        for e in range(6):
            for _ in range(3):
                assert sched.lrs[1] == pytest.approx(10 * sched.lrs[0]), name
                lowest = min(lowest, sched.lrs[1])
                opt.step()
                sched.step_batch()
            sched.step_epoch(0.5)
        assert sched.lrs[1] == pytest.approx(10 * sched.lrs[0]), name
        assert lowest < 1e-3 * 0.5, name  # it did decay


def test_cosine_restarts_jump_back_up_and_match_torch():
    opt = sgd(lr=1.0)
    sched = build_schedule(opt, name="cosine_restarts", epochs=30, steps_per_epoch=4, warmup_epochs=1,
                           restart_epochs=2, restart_mult=2, min_lr_ratio=0.1)
    lrs = run(sched, opt, 15, 4)
    after = lrs[4:]  # cycles of 8, 16, 32 steps after a 4-step warm-up
    assert after[0] == after[8] == after[24] == 1.0
    assert after[7] < 0.2 and after[23] < 0.2
    ref_opt = sgd(lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=8, T_mult=2, eta_min=0.1)
    expected = []
    for _ in after:
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert after == pytest.approx(expected)


def test_step_schedule_decays_at_epoch_boundaries():
    opt = sgd(lr=1.0)
    sched = build_schedule(opt, name="step", epochs=9, steps_per_epoch=2, step_epochs=3, step_gamma=0.1)
    lrs = run(sched, opt, 9, 2)
    assert lrs == pytest.approx([1.0] * 6 + [0.1] * 6 + [0.01] * 6)


def test_constant_schedule_with_fractional_warmup():
    opt = sgd(lr=0.5)
    sched = build_schedule(opt, name="constant", epochs=2, steps_per_epoch=4, warmup_epochs=0.5)
    assert run(sched, opt, 2, 4) == pytest.approx([0.25, 0.5] + [0.5] * 6)


def test_plateau_drops_after_patience_epochs_without_improvement():
    opt = sgd(lr=1.0)
    sched = build_schedule(opt, name="plateau", epochs=10, steps_per_epoch=2, warmup_epochs=1,
                           plateau_patience=2, plateau_factor=0.1, min_lr_ratio=0.005)
    metrics = [0.1, 0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]
    lrs = run(sched, opt, 10, 2, metrics)
    per_epoch = lrs[::2]
    assert lrs[:2] == [0.5, 1.0]  # warm-up epoch; its metric is ignored
    # ReduceLROnPlateau's patience: lower once MORE than `patience` epochs went without improvement.
    # Best 0.6 at epoch 3, no improvement in epochs 4, 5, 6 -> lower from epoch 7 on
    assert per_epoch == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    assert sched.lr == pytest.approx(0.01)  # epochs 8, 9, 10 without improvement over 0.7
    for _ in range(5):
        sched.step_epoch(0.0)
    assert sched.lr == pytest.approx(0.005)  # floor at min_lr_ratio * initial lr
    with pytest.raises(ValueError, match="validation metric"):
        sched.step_epoch()


@pytest.mark.parametrize("name", ["cosine", "cosine_restarts", "plateau", "step", "constant"])
def test_state_dict_resume_gives_the_same_following_lrs(name):
    kwargs = dict(name=name, epochs=8, steps_per_epoch=5, warmup_epochs=1.4, min_lr_ratio=0.01, restart_epochs=2,
                  step_epochs=2, plateau_patience=1)
    metrics = [0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3]
    opt = sgd(lr=0.3)
    full = run(build_schedule(opt, **kwargs), opt, 8, 5, metrics)

    opt = sgd(lr=0.3)
    sched = build_schedule(opt, **kwargs)
    head = run(sched, opt, 4, 5, metrics[:4])
    buf = io.BytesIO()
    torch.save({"schedule": sched.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain data, fits in a weights-only checkpoint

    opt2 = sgd(lr=0.3)
    resumed = build_schedule(opt2, **kwargs)
    resumed.load_state_dict(saved["schedule"])  # before the optimizer's state...
    opt2.load_state_dict(saved["optimizer"])  # ...or after: both restore the lrs
    tail = run(resumed, opt2, 4, 5, metrics[4:])
    assert head + tail == pytest.approx(full)
    assert resumed.steps == 40 and resumed.epochs == 8


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule(sgd(), name="linear", epochs=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="restart_mult"):
        build_schedule(sgd(), name="cosine_restarts", epochs=1, steps_per_epoch=1, restart_mult=1.5)
    with pytest.raises(ValueError, match=">= 1"):
        build_schedule(sgd(), epochs=1, steps_per_epoch=0)
    state = build_schedule(sgd(), name="step", epochs=1, steps_per_epoch=1).state_dict()
    with pytest.raises(ValueError, match="'step' schedule"):
        build_schedule(sgd(), name="cosine", epochs=1, steps_per_epoch=1).load_state_dict(state)


def test_early_stopping_max():
    es = EarlyStopping(patience=2, min_delta=0.01)
    assert [es.step(m) for m in [0.5, 0.6, 0.605, 0.61, 0.7, float("nan"), 0.69]] == [
        False, False, False, True, False, False, True]
    assert es.best == 0.7 and es.bad_epochs == 2


def test_early_stopping_min_patience_zero_and_state():
    es = EarlyStopping(patience=0, mode="min")
    assert es.step(1.0) is False and es.step(0.5) is False and es.step(0.5) is True
    es = EarlyStopping(patience=3, mode="min")
    for m in [1.0, 0.9, 0.95]:
        es.step(m)
    other = EarlyStopping(patience=3, mode="min")
    other.load_state_dict(es.state_dict())
    assert other.best == 0.9 and other.bad_epochs == 1
    assert [other.step(m) for m in (0.91, 0.92)] == [False, True]
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'up'"):
        EarlyStopping(mode="up")
    assert not EarlyStopping().improved(float("nan"))


def test_every_schedule_knob_reaches_the_schedule_from_the_command_line(small_folder, tmp_path):
    """`--schedule step` decayed every 30 epochs by 0.1 whatever was asked (no option reached them): a 10-epoch
    run was a constant one. Now --step-epochs/--step-gamma (and --restart-mult, --plateau-factor) are options."""
    import json

    from tests.conftest import TINY_KWARGS
    from training.__main__ import _parser
    from training.config import from_args
    from training.engine import Trainer
    cfg = from_args(_parser().parse_args([
        "train", "--data", str(small_folder), "--out", str(tmp_path / "run"), "--model-kwargs", json.dumps(TINY_KWARGS),
        "--input-size", "16", "--device", "cpu", "--schedule", "step", "--step-epochs", "2", "--step-gamma", "0.5",
        "--warmup-epochs", "0", "--restart-mult", "2", "--plateau-factor", "0.3", "--no-progress"]))
    assert (cfg.step_epochs, cfg.step_gamma, cfg.restart_mult, cfg.plateau_factor) == (2, 0.5, 2, 0.3)
    trainer = Trainer(cfg)
    factors = [trainer.schedule._lambda(s) for s in range(0, 10_000)]
    drops = [s for s in range(1, len(factors)) if factors[s] < factors[s - 1]]
    assert factors[0] == 1.0 and factors[drops[0]] == 0.5 and factors[drops[1]] == 0.25
    assert drops[0] == 2 * len(trainer.train_loader) and drops[1] == 2 * drops[0]  # every 2 epochs
