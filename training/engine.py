"""Training and evaluation loops."""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import ModelSpec, load_model, save_checkpoint
from .data import ImageFolderDataset
from .presets import EvalPreset, TrainPreset, normalize
from .tta import canvas_preset, predict_proba

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "cbam_resnet"
    model_kwargs: dict | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 0.2
    input_size: int = 32
    resize_size: int | None = None
    normalize: str = "dataset"
    workers: int = 0
    cache: bool = True
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    progress: bool = True


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, none on CPU (most CPUs lack fast bf16)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def split_dir(data: str, *names: str) -> str:
    for name in names:
        if os.path.isdir(os.path.join(data, name)):
            return os.path.join(data, name)
    raise FileNotFoundError(f"{data} has none of the sub-folders {', '.join(names)}")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 ``(N, C, H, W)`` images on the 0..1 scale."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def cosine_with_warmup(optimizer, *, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, spec: ModelSpec, *, device: torch.device, tta: str = "none",
            progress: bool = True, desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of the loader are TTA canvases (``training.tta.canvas_preset``)."""
    """Return ``(probabilities (N, K), labels (N,))`` in loader order."""
    model.eval()
    forward = lambda x: model(normalize(x, mean=spec.mean, std=spec.std))  # noqa: E731
    probs, labels = [], []
    for images, target in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=1.0):
        probs.append(predict_proba(forward, images.to(device), tta, crop_size=spec.input_size).cpu())
        labels.append(target)
    return torch.cat(probs), torch.cat(labels)


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, probs.shape[1])
    return (probs.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


def train(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.amp, device)
    os.makedirs(cfg.out, exist_ok=True)
    eval_preset = EvalPreset(crop_size=cfg.input_size, resize_size=cfg.resize_size)
    train_dir, test_dir = split_dir(cfg.data, "train"), split_dir(cfg.data, "test", "val")
    cache = eval_preset if cfg.cache else None
    train_ds = ImageFolderDataset(train_dir, cache_transform=cache, progress=cfg.progress,
                                  transform=TrainPreset(crop_size=cfg.input_size, resize_size=cfg.resize_size))
    test_ds = ImageFolderDataset(test_dir, cache_transform=cache, progress=cfg.progress,
                                 transform=None if cfg.cache else eval_preset)
    if train_ds.classes != test_ds.classes:
        raise ValueError(f"class folders differ between {train_dir} and {test_dir}")
    if cfg.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif cfg.normalize == "dataset":
        sample = train_ds.cache if train_ds.cache is not None else torch.stack(
            [eval_preset(train_ds[i][0]) for i in torch.randperm(len(train_ds))[:2000].tolist()])
        mean, std = channel_stats(sample)
    else:
        raise ValueError(f"--normalize must be 'dataset' or 'imagenet', not {cfg.normalize!r}")
    spec = ModelSpec(arch=cfg.arch, class_names=train_ds.classes, input_size=cfg.input_size,
                     resize_size=eval_preset.resize_size, mean=mean, std=std, model_kwargs=dict(cfg.model_kwargs or {}))
    model = spec.build().to(device)
    loader_kwargs = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                         persistent_workers=cfg.workers > 0)
    train_loader = DataLoader(train_ds, shuffle=True, drop_last=True, **loader_kwargs)
    test_loader = DataLoader(test_ds, shuffle=False, **{**loader_kwargs, "batch_size": cfg.batch_size * 2})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(train_loader)
    scheduler = cosine_with_warmup(optimizer, warmup_steps=max(1, int(cfg.warmup_epochs * len(train_loader))),
                                   total_steps=steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    log_path = os.path.join(cfg.out, "log.csv")
    with open(log_path, "w", newline="") as f:
        csv.writer(f).writerow(["epoch", "train_loss", "test_top1", "test_top5", "lr", "seconds"])
    best = {"test_top1": -1.0}
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start, total_loss, seen = time.time(), 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, mininterval=1.0)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(model(normalize(images, mean=mean, std=std)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        probs, labels = predict(model, test_loader, spec, device=device, progress=cfg.progress)
        metrics = {"epoch": epoch, "train_loss": total_loss / max(1, seen), "test_top1": topk_accuracy(probs, labels, 1),
                   "test_top5": topk_accuracy(probs, labels, 5)}
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([epoch, f"{metrics['train_loss']:.5f}", f"{metrics['test_top1']:.5f}",
                                    f"{metrics['test_top5']:.5f}", f"{scheduler.get_last_lr()[0]:.3e}",
                                    f"{time.time() - start:.1f}"])
        print(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, test top-1 {metrics['test_top1']:.2%}, "
              f"top-5 {metrics['test_top5']:.2%} ({time.time() - start:.0f} s)", flush=True)
        save_checkpoint(os.path.join(cfg.out, "last.pt"), spec, model, metrics=metrics)
        if metrics["test_top1"] > best["test_top1"]:
            best = metrics
            save_checkpoint(os.path.join(cfg.out, "best.pt"), spec, model, metrics=metrics)
    return best


def evaluate(checkpoint: str, data: str, *, tta: str = "none", batch_size: int = 256, out_csv: str | None = None,
             device: str = "auto", progress: bool = True) -> dict:
    """Top-1/top-5 of a checkpoint on an ImageFolder tree; optionally per-image predictions as CSV."""
    dev = pick_device(device)
    spec, model = load_model(checkpoint)
    model.to(dev)
    ds = ImageFolderDataset(data, transform=canvas_preset(tta, crop_size=spec.input_size, resize_size=spec.resize_size))
    if ds.classes != spec.class_names:
        raise ValueError(f"the classes of {data} ({ds.classes}) differ from the checkpoint's ({spec.class_names})")
    probs, labels = predict(model, DataLoader(ds, batch_size=batch_size), spec, device=dev, tta=tta,
                            progress=progress)
    result = {"images": len(ds), "top1": topk_accuracy(probs, labels, 1), "top5": topk_accuracy(probs, labels, 5),
              "tta": tta}
    if out_csv:
        os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
        conf, pred = probs.max(1)
        with open(out_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "label_name", "pred", "pred_name", "confidence"])
            for path, y, p, c in zip(ds.paths, labels.tolist(), pred.tolist(), conf.tolist()):
                w.writerow([path, y, spec.class_names[y], p, spec.class_names[p], f"{c:.6f}"])
    return result
