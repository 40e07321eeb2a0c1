"""The training loop: :class:`Trainer` and :func:`train`.

One loop serves a laptop CPU, one GPU and ``torchrun`` (DDP): the pieces are small modules of this
package (formats, stats, sampling, mixing, losses, optim, finetune, distributed, runtime, run_log,
reports) wired here. Each epoch is evaluated with :func:`training.evaluation.predict`, the same forward
as offline evaluation.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from inference.transforms import EvalPreset, normalize

from .checkpoint import ModelSpec, save_checkpoint
from .config import TrainConfig
from .datasets import LazyDataset
from .distributed import all_mean, barrier, broadcast, init_distributed, shutdown
from .evaluation import predict
from .finetune import ProgressiveUnfreezer, load_pretrained, param_groups, parse_schedule
from .formats import build_datasets
from .losses import build_loss, class_weights
from .mixing import BatchMixer
from .optim import EarlyStopping, build_optimizer, build_schedule
from .presets import TrainPreset
from .reports import nll, topk_accuracy
from .run_log import add_scalars, append_log, open_tensorboard, start_log
from .runtime import autocast_dtype, seed_everything
from .sampling import class_balanced_sampler
from .stats import dataset_stats, parse_normalize


def ema_avg_fn(decay: float):
    """EMA update for ``torch.optim.swa_utils.AveragedModel`` with timm's decay warm-up: the effective
    decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that in short runs the average
    is not dominated by the first, untrained weights (0.999 ** 1400 steps still weighs them 25%)."""
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged * d + current * (1.0 - d)
    return avg_fn


def train_preset(cfg: TrainConfig) -> TrainPreset:
    return TrainPreset(crop_size=cfg.input_size, resize_size=cfg.resize_size,
                       mode=cfg.augment, hflip_prob=cfg.hflip, rotation=cfg.rotation,
                       color_jitter=cfg.color_jitter, affine=cfg.affine, auto_augment=cfg.auto_augment,
                       random_erase=cfg.random_erase)


class Trainer:
    """Everything one run holds; ``run()`` trains, evaluates and checkpoints epoch by epoch."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.device)
        self.main = self.dist.is_main
        seed_everything(cfg.seed + self.dist.rank)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        os.makedirs(cfg.out, exist_ok=True)
        self._build_data()
        self._build_model()
        self._build_optimisation()
        self.start_epoch, self.history, self.writer = 1, [], None
        if cfg.resume:
            self._resume(cfg.resume)

    # -- set-up -------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.augment == "random_resized_crop" and cfg.cache:
            raise ValueError("--augment random_resized_crop needs --no-cache: the in-memory cache keeps only the "
                             "evaluation center crop, so the random crops could never see the rest of the image")
        self.eval_preset = EvalPreset(crop_size=cfg.input_size, resize_size=cfg.resize_size)
        progress = cfg.progress and self.main
        self.train_ds, self.test_ds = build_datasets(
            cfg.data, format=cfg.format, train_transform=train_preset(cfg),
            eval_transform=None if cfg.cache else self.eval_preset,
            cache_transform=self.eval_preset if cfg.cache else None, progress=progress)
        if list(self.train_ds.classes) != list(self.test_ds.classes):
            raise ValueError(f"the classes of the training and test splits of {cfg.data} differ")
        self.mean, self.std = parse_normalize(
            cfg.normalize, dataset_stats_fn=lambda: dataset_stats(self._stats_view(), max_images=5000,
                                                                   progress=progress))
        num_classes = len(self.train_ds.classes)
        self.spec = ModelSpec(arch=cfg.arch, class_names=list(self.train_ds.classes), input_size=cfg.input_size,
                              resize_size=self.eval_preset.resize_size, mean=tuple(self.mean), std=tuple(self.std),
                              model_kwargs=dict(cfg.model_kwargs or {}))
        if cfg.balanced_sampler and self.dist.enabled:
            raise ValueError("--balanced-sampler is not supported under torchrun (use --weighted-loss instead)")
        if cfg.balanced_sampler:
            sampler = class_balanced_sampler(self.train_ds.labels,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        else:  # also for one process: the same permutation as N processes would share between them
            sampler = DistributedSampler(self.train_ds, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=cfg.seed, drop_last=True)
        loader_kwargs = dict(num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                             persistent_workers=cfg.workers > 0)
        self.train_loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                       **loader_kwargs)
        if len(self.train_loader) == 0:
            raise ValueError(f"{len(self.train_ds)} training images are fewer than one batch of {cfg.batch_size} "
                             f"per process: lower --batch-size")
        self.test_loader = DataLoader(self.test_ds, batch_size=cfg.batch_size * 2, shuffle=False, **loader_kwargs)
        self.mixer = BatchMixer(num_classes=num_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                                prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob)

    def _stats_view(self):
        """The training images through the evaluation transform only (no augmentation) for mean/std."""
        ds = self.train_ds
        if getattr(ds, "cache", None) is not None:
            return ds.cache
        return LazyDataset(len(ds), lambda i: self.eval_preset(ds.read(i)))  # read(): before the training transform

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = self.spec.build()
        if cfg.pretrained:
            report = load_pretrained(model, cfg.pretrained)
            self.log(f"pretrained weights from {cfg.pretrained}: {report['loaded']} tensors loaded, "
                     f"{len(report['missing'])} missing, {len(report['skipped'])} skipped")
        self.unfreezer = ProgressiveUnfreezer(model, schedule=parse_schedule(cfg.unfreeze)) if cfg.unfreeze else None
        if cfg.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); on CPU each "
                             "process normalizes its own share of the batch")
        if cfg.sync_bn and self.dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the bare module: checkpoints, EMA and evaluation use it
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel
            self.ema = AveragedModel(model, avg_fn=ema_avg_fn(cfg.ema_decay), use_buffers=True)
        net = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.net = torch.compile(net) if cfg.compile else net

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        if cfg.backbone_lr_scale != 1.0 or self.unfreezer is not None:
            # finetune's groups keep frozen parameters, so stages unfrozen later are trained too
            params = param_groups(self.model, lr=cfg.lr, backbone_lr_scale=cfg.backbone_lr_scale,
                                  weight_decay=cfg.weight_decay)
        else:
            params = self.model
        self.optimizer = build_optimizer(params, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         momentum=cfg.momentum)
        self.schedule = build_schedule(self.optimizer, name=cfg.schedule, epochs=cfg.epochs,
                                       steps_per_epoch=len(self.train_loader), warmup_epochs=cfg.warmup_epochs,
                                       min_lr_ratio=cfg.min_lr_ratio, restart_epochs=cfg.restart_epochs,
                                       plateau_patience=cfg.plateau_patience)
        weight = None
        if cfg.weighted_loss:
            weight = class_weights(self.train_ds.labels, len(self.spec.class_names)).to(self.device)
        self.criterion = build_loss(cfg.loss, label_smoothing=cfg.label_smoothing, gamma=cfg.focal_gamma,
                                    alpha=cfg.focal_alpha, weight=weight)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.stopper = EarlyStopping(patience=cfg.early_stopping) if cfg.early_stopping else None
        self.best = {"test_top1": -1.0}

    def _resume(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if "optimizer" not in ckpt:
            raise ValueError(f"{path} holds no training state (optimizer, schedule): resume from RUN/last.pt")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema_state_dict") is not None:
            self.ema.load_state_dict(ckpt["ema_state_dict"])
        if self.stopper is not None and ckpt.get("early_stopping"):
            self.stopper.load_state_dict(ckpt["early_stopping"])
        # The schedule was built for this run's --epochs, so a longer run stretches it from here on;
        # a new --lr scales the peak (and with it the current and minimum) learning rates.
        if self.cfg.lr != ckpt["config"]["lr"]:
            self.schedule.scale_lr(self.cfg.lr / ckpt["config"]["lr"])
        self.best = dict(ckpt.get("best") or self.best)
        self.history = list(ckpt.get("history") or [])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.log(f"resumed from {path} at epoch {self.start_epoch} (best test top-1 so far "
                 f"{self.best['test_top1']:.2%})")

    # -- the loop -----------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.main:
            print(message, flush=True)

    def run(self) -> dict:
        self.begin()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs + 1):
                if self.run_epoch(epoch):
                    self.log(f"early stopping: no better test top-1 for {self.cfg.early_stopping} epochs")
                    break
        finally:
            self.finish()
        return self.best if self.main else {}

    def begin(self) -> None:
        if self.main:
            self.cfg.save_yaml(os.path.join(self.cfg.out, "config.yaml"))
            start_log(self.cfg.out, self.history)
        self.writer = open_tensorboard(self.cfg.out) if self.cfg.tensorboard and self.main else None

    def run_epoch(self, epoch: int) -> bool:
        """Train, evaluate, schedule and checkpoint one epoch; returns whether to stop early."""
        start = time.time()
        if self.unfreezer is not None:
            opened = self.unfreezer.apply(epoch - 1)
            if opened:
                self.log(f"epoch {epoch}: unfroze {', '.join(opened)}")
        train_loss = self.train_one_epoch(epoch)
        metrics = self.evaluate_epoch(epoch, train_loss, time.time() - start)
        return bool(broadcast(self.end_of_epoch(epoch, metrics, self.writer), self.dist))

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
        barrier(self.dist)
        shutdown(self.dist)

    def train_one_epoch(self, epoch: int) -> float:
        cfg = self.cfg
        self.net.train()
        if self.unfreezer is not None:
            self.unfreezer.set_train_mode()
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total, seen = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and self.main),
                   mininterval=1.0)
        for images, labels in bar:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            x = normalize(images, mean=self.mean, std=self.std)
            if self.mixer.enabled:
                x, labels = self.mixer(x, labels)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.criterion(self.net(x), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step_batch()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total += loss.item() * len(images)
            seen += len(images)
            bar.set_postfix(loss=f"{total / seen:.4f}", lr=f"{self.schedule.lr:.2e}")
        return all_mean(total / max(1, seen), self.dist, self.device if self.device.type == "cuda" else
                        torch.device("cpu"))

    def evaluate_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict | None:
        """Rank 0 evaluates the whole test split (the model and, with --ema, the EMA weights)."""
        if not self.main:
            return None
        probs, labels = predict(self.model, self.test_loader, self.spec, device=self.device,
                                progress=self.cfg.progress)
        metrics = {"epoch": epoch, "train_loss": train_loss, "test_loss": nll(probs, labels),
                   "test_top1": topk_accuracy(probs, labels, 1), "test_top5": topk_accuracy(probs, labels, 5),
                   "lr": self.schedule.lr, "weights": "model"}
        if self.ema is not None:
            ema_probs, _ = predict(self.ema.module, self.test_loader, self.spec, device=self.device,
                                   progress=self.cfg.progress, desc="evaluate EMA")
            metrics["ema_top1"] = topk_accuracy(ema_probs, labels, 1)
            metrics["ema_top5"] = topk_accuracy(ema_probs, labels, 5)
        metrics["seconds"] = seconds + 0.0
        return metrics

    def end_of_epoch(self, epoch: int, metrics: dict | None, writer) -> bool:
        """Schedule, checkpoints, log; returns whether to stop early (rank 0 decides)."""
        score = broadcast(None if metrics is None else max(metrics["test_top1"], metrics.get("ema_top1", -1.0)),
                          self.dist)
        self.schedule.step_epoch(score)
        if not self.main:
            return False
        use_ema = self.ema is not None and metrics["ema_top1"] > metrics["test_top1"]
        selected = {"weights": "ema" if use_ema else "model", "selected_top1": score}
        metrics.update(selected)
        self.history.append(metrics)
        append_log(self.cfg.out, metrics)
        ema_txt = f", EMA top-1 {metrics['ema_top1']:.2%}" if self.ema is not None else ""
        self.log(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, test loss {metrics['test_loss']:.4f}, "
                 f"test top-1 {metrics['test_top1']:.2%}, top-5 {metrics['test_top5']:.2%}{ema_txt} "
                 f"({metrics['seconds']:.0f} s)")
        if writer is not None:
            add_scalars(writer, metrics, epoch)
        stop = self.stopper.step(score) if self.stopper is not None else False
        improved = score > self.best.get("selected_top1", self.best["test_top1"])
        if improved:
            self.best = dict(metrics)
        self._save(os.path.join(self.cfg.out, "last.pt"), epoch, metrics, weights=self.model, training_state=True)
        if improved:
            weights = self.ema.module if use_ema else self.model
            self._save(os.path.join(self.cfg.out, "best.pt"), epoch, metrics, weights=weights, training_state=False)
        return stop

    # -- files ----------------------------------------------------------------------------------------
    def _save(self, path: str, epoch: int, metrics: dict, *, weights: nn.Module, training_state: bool) -> None:
        extra = {"epoch": epoch, "config": self.cfg.to_dict(), "best": self.best, "history": self.history}
        if training_state:  # what --resume needs; best.pt stays a lean deployable checkpoint
            extra.update(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                         scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                         ema_state_dict=self.ema.state_dict() if self.ema is not None else None,
                         early_stopping=self.stopper.state_dict() if self.stopper is not None else None)
        save_checkpoint(path, self.spec, weights, metrics=metrics, extra=extra)


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns the best epoch's metrics (rank 0; other ranks get ``{}``)."""
    return Trainer(cfg.validate()).run()
