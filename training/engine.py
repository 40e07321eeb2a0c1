"""Training and evaluation loops.

One loop serves a laptop CPU, one GPU and ``torchrun`` (DDP): the pieces are small modules of this
package (data, presets, mixing, losses, optim, finetune, distributed, reports) wired here.
"""
from __future__ import annotations

import csv
import os
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .checkpoint import ModelSpec, load_model, save_checkpoint
from .config import TrainConfig
from .data import build_datasets, class_balanced_sampler, dataset_stats, parse_normalize
from .distributed import DistInfo, all_mean, barrier, broadcast, init_distributed, shutdown
from .finetune import ProgressiveUnfreezer, load_pretrained, param_groups, parse_schedule
from .losses import build_loss, class_weights
from .mixing import BatchMixer
from .optim import EarlyStopping, build_optimizer, build_schedule
from .presets import EvalPreset, TrainPreset, normalize
from .reports import topk_accuracy
from .tta import canvas_preset, predict_proba

LOG_COLUMNS = ["epoch", "train_loss", "test_loss", "test_top1", "test_top5", "ema_top1", "lr", "seconds"]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, none on CPU (most CPUs lack fast bf16)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, spec: ModelSpec, *, device: torch.device, tta: str = "none",
            progress: bool = True, desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(probabilities (N, K), labels (N,))`` in loader order; batches are TTA canvases
    (``training.tta.canvas_preset``)."""
    model.eval()
    forward = lambda x: model(normalize(x, mean=spec.mean, std=spec.std))  # noqa: E731
    probs, labels = [], []
    for images, target in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=1.0):
        probs.append(predict_proba(forward, images.to(device), tta, crop_size=spec.input_size).float().cpu())
        labels.append(target)
    return torch.cat(probs), torch.cat(labels)


def ema_avg_fn(decay: float):
    """EMA update for ``torch.optim.swa_utils.AveragedModel`` with timm's decay warm-up: the effective
    decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that in short runs the average
    is not dominated by the first, untrained weights (0.999 ** 1400 steps still weighs them 25%)."""
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged * d + current * (1.0 - d)
    return avg_fn


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (the plain cross-entropy of the predictions)."""
    return -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()


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
        return _Lazy(len(ds), lambda i: self.eval_preset(ds.read(i)))  # read(): before the training transform

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
            self._write_log_header()
        self.writer = self._tensorboard()

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
        self._append_log(metrics)
        ema_txt = f", EMA top-1 {metrics['ema_top1']:.2%}" if self.ema is not None else ""
        self.log(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, test loss {metrics['test_loss']:.4f}, "
                 f"test top-1 {metrics['test_top1']:.2%}, top-5 {metrics['test_top5']:.2%}{ema_txt} "
                 f"({metrics['seconds']:.0f} s)")
        if writer is not None:
            for key in ("train_loss", "test_loss", "test_top1", "test_top5", "ema_top1", "lr"):
                if key in metrics:
                    writer.add_scalar(key, metrics[key], epoch)
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

    def _write_log_header(self) -> None:
        path = os.path.join(self.cfg.out, "log.csv")
        rows = [[h.get(c, "") for c in LOG_COLUMNS] for h in self.history]  # kept on --resume
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([LOG_COLUMNS, *rows])

    def _append_log(self, m: dict) -> None:
        fmt = {"lr": "{:.3e}", "seconds": "{:.1f}", "epoch": "{}"}
        row = [fmt.get(c, "{:.5f}").format(m[c]) if c in m else "" for c in LOG_COLUMNS]
        with open(os.path.join(self.cfg.out, "log.csv"), "a", newline="") as f:
            csv.writer(f).writerow(row)

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
        return SummaryWriter(os.path.join(self.cfg.out, "tensorboard"))


class _Lazy(torch.utils.data.Dataset):
    """``(load(i), label)`` for ``i < n``: images computed on access (mean/std, unlabelled folders)."""

    def __init__(self, n: int, load, label: int = 0):
        self.n, self.load, self.label = n, load, label

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.load(i), self.label


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns the best epoch's metrics (rank 0; other ranks get ``{}``)."""
    return Trainer(cfg.validate()).run()


def eval_dataset(data: str, *, format: str = "auto", transform=None):
    """The labelled images to evaluate on: a class-folder tree (``DIR/test``), or the test split of any
    data-set root that ``train`` reads (ImageFolder root, iNaturalist JSON, CIFAR pickles)."""
    from .data import ImageFolderDataset, build_datasets, detect_format

    if format == "auto":
        try:
            format = detect_format(data)
        except (ValueError, FileNotFoundError):
            format = "folder"  # not a data-set root: the class folders themselves
    if format == "folder":
        return ImageFolderDataset(data, transform=transform, progress=False)
    return build_datasets(data, format=format, eval_transform=transform, progress=False)[1]


def evaluate(checkpoint: str, data: str, *, tta: str = "none", batch_size: int = 256, out_dir: str | None = None,
             device: str = "auto", progress: bool = True, plots: bool = True, format: str = "auto") -> dict:
    """Evaluate a checkpoint on labelled images (see :func:`eval_dataset`): top-1/3/5, macro
    precision/recall/F1, per-class numbers and the confusion matrix; with ``out_dir``: metrics.json,
    predictions.csv and PNG plots."""
    import json

    from .reports import (classification_metrics, classification_report, plot_confusion_matrix,
                          plot_per_class_accuracy, plot_training_curves, write_predictions_csv)

    dev = pick_device(device)
    spec, model = load_model(checkpoint)
    model.to(dev)
    ds = eval_dataset(data, format=format, transform=canvas_preset(tta, crop_size=spec.input_size,
                                                                   resize_size=spec.resize_size))
    if list(ds.classes) != spec.class_names:
        raise ValueError(f"the classes of {data} ({ds.classes}) differ from the checkpoint's ({spec.class_names})")
    probs, labels = predict(model, DataLoader(ds, batch_size=batch_size), spec, device=dev, tta=tta,
                            progress=progress)
    metrics = {**classification_metrics(probs, labels, spec.class_names), "tta": tta, "checkpoint": str(checkpoint),
               "data": str(data)}
    metrics["report"] = classification_report(metrics)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        write_predictions_csv(os.path.join(out_dir, "predictions.csv"), ds.paths, labels, probs, spec.class_names)
        if plots:
            metrics["plots"] = [
                plot_confusion_matrix(metrics["confusion"], spec.class_names,
                                      os.path.join(out_dir, "confusion_matrix.png")),
                plot_per_class_accuracy(metrics, os.path.join(out_dir, "per_class_accuracy.png"))]
            log_csv = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.csv")
            if os.path.isfile(log_csv):
                metrics["plots"].append(plot_training_curves(log_csv, os.path.join(out_dir, "training_curves.png")))
    return metrics


def predict_folder(checkpoint: str, images: str, *, out_csv: str, tta: str = "none", batch_size: int = 256,
                   device: str = "auto", topk: int = 1, progress: bool = True) -> int:
    """Predictions for an unlabelled folder (searched recursively) as CSV; returns the image count."""
    from pathlib import Path

    from .data import IMAGE_EXTENSIONS
    from .images import read_image_file
    from .reports import write_predictions_csv

    paths = sorted(str(p) for p in Path(images).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {images}")
    dev = pick_device(device)
    spec, model = load_model(checkpoint)
    model.to(dev)
    preset = canvas_preset(tta, crop_size=spec.input_size, resize_size=spec.resize_size)
    ds = _Lazy(len(paths), lambda i: preset(read_image_file(paths[i])), label=-1)
    probs, _ = predict(model, DataLoader(ds, batch_size=batch_size), spec, device=dev, tta=tta, progress=progress,
                       desc="predict")
    os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
    write_predictions_csv(out_csv, paths, None, probs, spec.class_names, topk=topk)
    return len(paths)
