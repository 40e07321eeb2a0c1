"""The training loop: :class:`Trainer` and :func:`train`.

One loop serves a laptop CPU, one GPU and ``torchrun`` (DDP): the pieces are small modules of this
package (formats, stats, sampling, mixing, losses, optim, finetune, distributed, runtime, run_log,
reports) wired here. Each epoch is evaluated with :func:`training.evaluation.predict`, the same forward
as offline evaluation.

Which split is used for what:

* every epoch the model (and the EMA) is evaluated on the **validation** split (``DATA/val`` next to
  ``DATA/test``, or ``--val-fraction`` of the training images); ``best.pt`` keeps the best epoch's
  weights by validation top-1 (ties: lower validation loss), ``log.csv`` has the ``val_*`` numbers;
* the **test** split is read once, after the last epoch, to evaluate ``best.pt``
  (``RUN/test_metrics.json``, and ``best.pt``'s ``metrics``); nothing during training reads it;
* without a validation split (``--val-fraction 0``) ``best.pt`` is the last epoch.

``last.pt`` holds everything an exact ``--resume`` needs, the random generators' states included;
``best.pt`` is written before ``last.pt`` records it, both atomically.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from inference.transforms import EvalPreset, normalize

from .checkpoint import ModelSpec, load_checkpoint, read_checkpoint, save_checkpoint, write_atomically
from .config import TrainConfig
from .datasets import (
    LazyDataset,
    ReadableImages,
    TrainingImages,
    check_bad_images,
    collate_readable,
    collate_reporting,
    split_digest,
)
from .distributed import all_mean, barrier, broadcast, check_in_step, gather, init_distributed, shutdown
from .evaluation import predict
from .finetune import ProgressiveUnfreezer, load_pretrained, param_groups, parse_schedule
from .formats import build_splits
from .losses import build_loss, class_weights
from .mixing import BatchMixer
from .models import build_model, list_models
from .optim import EarlyStopping, build_optimizer, build_schedule
from .presets import TrainPreset
from .progress import tqdm
from .reports import nll, topk_accuracy
from .run_folder import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    claim_run_folder,
    drop_set_aside,
    restore_set_aside,
    set_aside,
    unlock_run_folder,
)
from .run_log import (
    TEST_METRICS_FILE,
    add_scalars,
    append_log,
    open_tensorboard,
    start_log,
    write_test_metrics,
)
from .runtime import autocast_dtype, rng_state, seed_everything, set_rng_state
from .sampling import EpochSampler, class_balanced_sampler
from .stats import dataset_stats, parse_normalize

# What the fork server imports once, so that each worker forked from it starts in milliseconds, not seconds.
WORKER_PRELOAD = ("torch", "torchvision", "PIL.Image", "training.datasets", "training.formats", "training.presets")


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
                       random_erase=cfg.random_erase, cached=cfg.cache)


def _short(names: list) -> str:
    """A class list for a one-line message: all of a short list, else its length and first entries."""
    names = list(names)
    return str(names) if len(names) <= 12 else f"[{len(names)} classes: {', '.join(map(str, names[:5]))}, ...]"


def _better(a: tuple[float, float], b: tuple[float, float] | None) -> bool:
    """Whether ``(top1, loss)`` ``a`` beats ``b``: higher top-1, then lower loss (NaN never wins)."""
    if b is None:
        return True
    if a[0] != b[0]:
        return a[0] > b[0]
    return a[1] < b[1]


class Trainer:
    """Everything one run holds; ``run()`` trains, validates and checkpoints epoch by epoch, then
    evaluates ``best.pt`` once on the test split."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.device)
        self.main = self.dist.is_main
        seed_everything(cfg.seed + self.dist.rank)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        resume = self._open_resume(cfg.resume) if cfg.resume else None  # refuse a mismatch before any work
        self._check_model_options()
        # before rank 0 writes; rank 0 holds the folder's lock until finish() (or its process ends)
        made = not os.path.isdir(cfg.out)
        self.replaced = claim_run_folder(cfg.out, resume=cfg.resume, force=cfg.force, lock=self.main)
        os.makedirs(cfg.out, exist_ok=True)
        try:
            self.bad_images: dict[str, str] = {}  # every unreadable training image met so far: path -> reason
            self._build_data()
            self._build_model()
            self._build_optimisation()
            self.start_epoch, self.history, self.writer = 1, [], None
            if resume is not None:
                self._resume(cfg.resume, resume)
        except BaseException:
            unlock_run_folder(cfg.out)
            if made:  # a folder made for this run and left empty: not left behind
                with contextlib.suppress(OSError):
                    os.rmdir(cfg.out)
            raise

    # -- set-up -------------------------------------------------------------------------------------
    def _check_model_options(self) -> None:
        """The architecture, ``--model-kwargs`` (a forward of one ``--input-size`` image), ``--unfreeze`` and
        ``--pretrained``'s file, checked on a 2-class model without storage (meta device, milliseconds): a typo
        is one line before the data (maybe thousands of photos and their statistics) is read."""
        cfg = self.cfg
        try:
            with torch.device("meta"), warnings.catch_warnings():  # torch warns of zero-element weights: said below
                warnings.simplefilter("ignore")
                model = build_model(cfg.arch, num_classes=2, **dict(cfg.model_kwargs or {}))
        except (TypeError, ValueError, RuntimeError) as e:  # an argument it does not take, a width below 0, ...
            if cfg.arch not in list_models():
                raise ValueError(f"--arch {cfg.arch}: {str(e).splitlines()[0]}") from None
            raise ValueError(f"--model-kwargs {cfg.model_kwargs}: {str(e).splitlines()[0]}") from None
        try:  # shapes only: widths of 0, or an input too small for the architecture's strides
            with torch.device("meta"):
                model.eval()(torch.empty(1, 3, cfg.input_size, cfg.input_size))
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"--arch {cfg.arch} --model-kwargs {cfg.model_kwargs} cannot run on a "
                             f"{cfg.input_size}x{cfg.input_size} input: {str(e).splitlines()[0]}") from None
        if cfg.unfreeze:
            ProgressiveUnfreezer(model, schedule=parse_schedule(cfg.unfreeze))
        if cfg.backbone_lr_scale != 1.0 and not isinstance(getattr(model, "backbone", None), nn.Module):
            raise ValueError(f"--backbone-lr-scale {cfg.backbone_lr_scale}: --arch {cfg.arch} has no backbone to "
                             "scale (the models built on a torchvision ResNet/ResNeXt backbone have one)")
        if cfg.pretrained_partial and not cfg.pretrained:
            raise ValueError("--pretrained-partial needs --pretrained FILE")
        if cfg.pretrained and not os.path.isfile(cfg.pretrained):
            raise FileNotFoundError(f"--pretrained {cfg.pretrained}: file not found (nothing is downloaded)")

    def _build_data(self) -> None:
        """The splits and their data sets, the model's facts (classes, mean/std), the loaders, the log line."""
        self._build_datasets()
        self._build_spec()
        self._build_loaders()
        self._log_data()

    def _build_datasets(self) -> None:
        """Training, validation and test images (``self.splits``, ``train_ds``, ``val_ds``, ``test_ds``) and the
        record of the split that will choose ``best.pt`` (``self.selection``)."""
        cfg = self.cfg
        if cfg.augment == "random_resized_crop" and cfg.cache:
            raise ValueError("--augment random_resized_crop needs --no-cache: the in-memory cache keeps only the "
                             "evaluation center crop, so the random crops could never see the rest of the image")
        self.eval_preset = EvalPreset(crop_size=cfg.input_size, resize_size=cfg.resize_size)
        progress = cfg.progress and self.main
        self.splits = splits = build_splits(
            cfg.data, format=cfg.format, train_transform=train_preset(cfg), eval_transform=self.eval_preset,
            cache=cfg.cache, val_fraction=cfg.val_fraction, seed=cfg.seed, max_bad_images=cfg.max_bad_images,
            progress=progress)
        self.note_bad_images(splits.bad_images)
        self.note_bad_images(splits.val_bad_images, enforce=False, split="validation")  # capped while caching
        # the training images: augmentation seeded per (seed, epoch, index), unreadable files replaced and reported
        self.train_ds = TrainingImages(splits.train, seed=cfg.seed, max_bad_images=cfg.max_bad_images)
        if splits.val is None:
            self.val_ds = None
        elif getattr(splits.val, "cache", None) is None and (not splits.val_carved or not cfg.cache):
            # decoded per access (--no-cache): an unreadable image is left out and named, never replaced by the
            # next one (which would count that one twice in the validation top-1 that chooses best.pt)
            self.val_ds = ReadableImages(splits.val)
        elif splits.val_carved:  # cached: its unreadable images were skipped and counted while caching
            self.val_ds = TrainingImages(splits.val, max_bad_images=cfg.max_bad_images)
        else:
            self.val_ds = splits.val
        self.test_ds = ReadableImages(splits.test)  # read once, at the end (test_best); never cached
        if cfg.early_stopping and self.val_ds is None:
            raise ValueError("--early-stopping needs a validation split: with --val-fraction 0 and no val/ folder "
                             "there is none (the test split is never used to choose)")
        self.selection = {"split": None if self.val_ds is None else "val", "source": splits.val_name,
                          "images": 0 if self.val_ds is None else len(self.val_ds),
                          "digest": None if self.val_ds is None else split_digest(self.val_ds)}

    def _build_spec(self) -> None:
        """The normalization (``self.mean``/``std``) and the checkpoint's model facts (``self.spec``)."""
        cfg, progress = self.cfg, self.cfg.progress and self.main
        self.mean, self.std = parse_normalize(
            cfg.normalize, dataset_stats_fn=lambda: dataset_stats(self._stats_view(), max_images=5000,
                                                                   progress=progress))
        num_classes = len(self.train_ds.classes)
        if num_classes < 2:  # the loss is 0 from the start: a model that answers its one class at 100%
            raise ValueError(f"{self.splits.train_name} holds {num_classes} class ({', '.join(self.train_ds.classes)}): "
                             "a classifier needs at least 2 classes")
        self.spec = ModelSpec(arch=cfg.arch, class_names=list(self.train_ds.classes), input_size=cfg.input_size,
                              resize_size=self.eval_preset.resize_size, mean=tuple(self.mean), std=tuple(self.std),
                              model_kwargs=dict(cfg.model_kwargs or {}))

    def _build_loaders(self) -> None:
        """The sampler, the DataLoaders (worker start, batch size clamped to a small set) and the batch mixer."""
        cfg = self.cfg
        if cfg.balanced_sampler and self.dist.enabled:
            raise ValueError("--balanced-sampler is not supported under torchrun (use --weighted-loss instead)")
        self.sampler_generator = None
        if cfg.balanced_sampler:  # its generator's state goes into last.pt
            self.sampler_generator = torch.Generator().manual_seed(cfg.seed)
            sampler = class_balanced_sampler(self.train_ds.labels, generator=self.sampler_generator)
        else:  # also for one process: the same permutation as N processes would share between them
            sampler = DistributedSampler(self.train_ds, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=cfg.seed, drop_last=True)
        # Workers start from a fork server by default (--worker-start), not by forking this process: a fork
        # copies the locks that this process's other threads hold (gRPC, ONNX Runtime, OpenVINO, OpenMP pools of
        # a program that embeds the Trainer), and the parent or child then hangs now and then (measured: a loop of
        # gRPC calls then a 1-worker DataLoader hung in 5 of 5 runs). Python 3.14 makes forkserver Linux's default
        # for the same reason.
        # The fork server starts once per process and imports WORKER_PRELOAD once; each worker forked from it
        # starts in milliseconds. The data set is pickled to each worker (cached tensors go through shared
        # memory, once).
        context = None
        if cfg.workers > 0:
            context = multiprocessing.get_context(cfg.worker_start)
            if cfg.worker_start == "forkserver":
                context.set_forkserver_preload(list(WORKER_PRELOAD))  # takes effect when the server first starts
        self.loader_kwargs = dict(num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                                  multiprocessing_context=context)
        # Each loader draws its workers' base seed from a generator of its own, not torch's global one,
        # so the global stream (dropout, Mixup/CutMix) does not depend on when iterators are created.
        per_process = len(self.train_ds) // self.dist.world_size
        batch_size = cfg.batch_size
        if batch_size > per_process >= 2:  # a small set trains: one batch of everything it has
            batch_size = per_process
            if self.main:
                print(f"warning: --batch-size {cfg.batch_size} is larger than the {per_process} training images per "
                      f"process; training with batches of {batch_size}", file=sys.stderr, flush=True)
        self.train_loader = DataLoader(self.train_ds, batch_size=batch_size, sampler=EpochSampler(sampler),
                                       drop_last=True, collate_fn=collate_reporting, persistent_workers=cfg.workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.seed), **self.loader_kwargs)
        if len(self.train_loader) == 0:
            raise ValueError(f"{len(self.train_ds)} training images are too few to train on ({per_process} per process; "
                             "batch normalization needs at least 2 per batch): add images")
        self.val_loader = None
        if self.val_ds is not None:
            self.val_loader = DataLoader(
                self.val_ds, batch_size=cfg.batch_size * 2, shuffle=False, persistent_workers=cfg.workers > 0,
                collate_fn={TrainingImages: collate_reporting, ReadableImages: collate_readable}.get(type(self.val_ds)),
                generator=torch.Generator().manual_seed(cfg.seed), **self.loader_kwargs)
        self.mixer = BatchMixer(num_classes=len(self.train_ds.classes), mixup_alpha=cfg.mixup_alpha,
                                cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob)

    def _log_data(self) -> None:
        cfg, splits = self.cfg, self.splits
        self.log(f"data: {len(self.train_ds)} training images ({splits.train_name}); "
                 + (f"validation split, which chooses best.pt: {len(self.val_ds)} images ({splits.val_name}); "
                    if self.val_ds is not None else
                    "no validation split (--val-fraction 0, no val/ folder): best.pt is the last epoch's weights"
                    f"{' (EMA)' if cfg.ema else ''}; ")
                 + f"test split: {len(self.test_ds)} images ({splits.test_name}), evaluated once, at the end")

    def _stats_view(self):
        """The training images through the evaluation transform only (no augmentation) for mean/std."""
        train = self.splits.train
        if getattr(train, "cache", None) is not None:
            return train.cache
        cached = getattr(train, "cached", False)  # a subset of a cached data set: the cache is evaluation-sized

        def load(i):
            image, _, bad = self.train_ds.read_robust(i)  # before the training transform
            self.note_bad_images(bad)
            return image if cached else self.eval_preset(image)
        return LazyDataset(len(train), load)

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = self.spec.build()
        if self.dist.enabled:  # then each rank its own stream again (dropout, Mixup/CutMix, augmentation draws)
            torch.manual_seed(cfg.seed + self.dist.rank)
        if cfg.pretrained:
            report = load_pretrained(model, cfg.pretrained, partial=cfg.pretrained_partial)
            left = "".join(f"; {what}: {', '.join(report[what][:5])}{' ...' if len(report[what]) > 5 else ''}"
                           for what in ("missing", "unexpected", "skipped") if report[what])
            self.log(f"pretrained weights from {cfg.pretrained}: {len(report['loaded'])} tensors loaded, "
                     f"{len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
                     f"{len(report['skipped'])} skipped{left}")
        if cfg.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); on CPU each "
                             "process normalizes its own share of the batch")
        if cfg.sync_bn and self.dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # after the conversion: the unfreezer keeps the stages' modules (their BatchNorm stays in eval mode)
        self.unfreezer = ProgressiveUnfreezer(model, schedule=parse_schedule(cfg.unfreeze)) if cfg.unfreeze else None
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the bare module: checkpoints, EMA and evaluation use it
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel
            self.ema = AveragedModel(model, avg_fn=ema_avg_fn(cfg.ema_decay), use_buffers=True)
        self._wrap()

    def _wrap(self) -> None:
        """``self.net``, the model as it trains: DDP across processes, compiled with --compile. DDP averages
        the gradients of the parameters that needed them when it was built, so it is built again when
        --unfreeze opens a stage: else that stage would train on each process's own gradients and the
        processes' copies would drift apart."""
        net = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.net = torch.compile(net) if self.cfg.compile else net

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
                                       restart_mult=cfg.restart_mult, plateau_patience=cfg.plateau_patience,
                                       plateau_factor=cfg.plateau_factor, step_epochs=cfg.step_epochs,
                                       step_gamma=cfg.step_gamma)
        weight = None
        if cfg.weighted_loss:
            weight = class_weights(self.train_ds.labels, len(self.spec.class_names)).to(self.device)
        self.criterion = build_loss(cfg.loss, label_smoothing=cfg.label_smoothing, gamma=cfg.focal_gamma,
                                    alpha=cfg.focal_alpha, weight=weight)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.stopper = EarlyStopping(patience=cfg.early_stopping) if cfg.early_stopping else None
        self.best: dict = {}  # the metrics of the epoch best.pt holds

    # -- resume -------------------------------------------------------------------------------------
    def _open_resume(self, path: str) -> dict:
        """Load ``--resume``'s checkpoint and refuse it when the architecture or image size differ
        (the classes, mean/std and validation split are checked once the data is read)."""
        cfg = self.cfg
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {path}: checkpoint not found")
        ckpt = read_checkpoint(path, what="--resume")
        if "optimizer" not in ckpt:
            raise ValueError(f"{path} holds no training state (optimizer, schedule): resume from RUN/last.pt")
        where = f"--resume {path}: the checkpoint's"
        if ckpt["arch"] != cfg.arch:
            raise ValueError(f"{where} architecture {ckpt['arch']!r} differs from --arch {cfg.arch!r}")
        if dict(ckpt.get("model_kwargs") or {}) != dict(cfg.model_kwargs or {}):
            raise ValueError(f"{where} architecture arguments (--model-kwargs) {dict(ckpt.get('model_kwargs') or {})} "
                             f"differ from {dict(cfg.model_kwargs or {})}")
        if int(ckpt["input_size"]) != cfg.input_size:
            raise ValueError(f"{where} input size {ckpt['input_size']} differs from --input-size {cfg.input_size}")
        saved = dict(ckpt.get("config") or {})
        for key in ("optimizer", "backbone_lr_scale"):  # the optimizer state (and its groups' rates) is built for them
            if key in saved and saved[key] != getattr(cfg, key):
                raise ValueError(f"{where} --{key.replace('_', '-')} {saved[key]!r} cannot change on --resume (to "
                                 f"{getattr(cfg, key)!r}): its optimizer state is of that one; start a new run (or "
                                 "fine-tune from the checkpoint with --pretrained)")
        resize = EvalPreset(crop_size=cfg.input_size, resize_size=cfg.resize_size).resize_size
        if int(ckpt.get("resize_size") or ckpt["input_size"]) != resize:
            raise ValueError(f"{where} resize size {ckpt.get('resize_size')} differs from this run's {resize} "
                             f"(--resize-size {cfg.resize_size})")
        return ckpt

    def _check_resume_data(self, path: str, ckpt: dict) -> None:
        cfg = self.cfg
        where = f"--resume {path}: the checkpoint's"
        if list(ckpt["class_names"]) != list(self.spec.class_names):
            raise ValueError(f"{where} classes {_short(ckpt['class_names'])} differ from {cfg.data}'s "
                             f"{_short(self.spec.class_names)}")
        # the validation split first: a different one also changes the training images' mean/std
        was = ckpt.get("selection")
        if was is not None and (was.get("split"), was.get("digest")) != (self.selection["split"],
                                                                          self.selection["digest"]):
            def describe(s: dict) -> str:
                if not s.get("split"):
                    return "none"
                return s["source"] if str(s["source"]).startswith(f"{s['images']} images") else \
                    f"{s['images']} images, {s['source']}"
            raise ValueError(f"{where} validation split ({describe(was)}) differs from this run's "
                             f"({describe(self.selection)}): resume with the same --data, --val-fraction and --seed")
        saved = (tuple(float(v) for v in ckpt["mean"]), tuple(float(v) for v in ckpt["std"]))
        if any(abs(a - b) > 1e-6 for a, b in zip(saved[0] + saved[1], tuple(self.mean) + tuple(self.std))):
            fmt = lambda v: "(" + ", ".join(f"{x:.4f}" for x in v) + ")"  # noqa: E731
            raise ValueError(f"{where} normalization mean {fmt(saved[0])} / std {fmt(saved[1])} differs from this "
                             f"run's mean {fmt(self.mean)} / std {fmt(self.std)} (--normalize {cfg.normalize} on "
                             f"{cfg.data})")

    def _resume(self, path: str, ckpt: dict) -> None:
        self._check_resume_data(path, ckpt)
        self.model.load_state_dict(ckpt["state_dict"])
        given = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                 for g in self.optimizer.param_groups]  # this run's --weight-decay, --momentum, ...
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])  # (which brings back the checkpoint's: given win)
        except ValueError as e:  # other parameter groups: --unfreeze (or --backbone-lr-scale) set or unset
            raise ValueError(f"--resume {path}: the checkpoint's optimizer state does not fit this run's parameter "
                             f"groups ({e}): keep --unfreeze and --backbone-lr-scale as the run had them") from None
        for group, options in zip(self.optimizer.param_groups, given):
            group.update(options)
        self.schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema_state_dict") is not None:
            self.ema.load_state_dict(ckpt["ema_state_dict"])
        if self.stopper is not None and ckpt.get("early_stopping"):
            self.stopper.load_state_dict(ckpt["early_stopping"])
        saved_cfg = dict(ckpt.get("config") or {})
        # The schedule was built for this run's --epochs, so a longer run stretches it from here on;
        # a new --lr scales the peak (and with it the current and minimum) learning rates.
        if "lr" in saved_cfg and self.cfg.lr != saved_cfg["lr"]:
            self.schedule.scale_lr(self.cfg.lr / saved_cfg["lr"])
        self.best = dict(ckpt.get("best") or {})
        if "selected_val_top1" not in self.best:  # an older checkpoint's (chosen on the test split): start over
            self.best = {}
        self.history = list(ckpt.get("history") or [])
        for bad_path, reason in ckpt.get("bad_images") or []:
            self.bad_images.setdefault(bad_path, reason)
        self.start_epoch = int(ckpt["epoch"]) + 1
        if self.sampler_generator is not None and ckpt.get("sampler_generator") is not None:
            self.sampler_generator.set_state(ckpt["sampler_generator"])
        states = ckpt.get("rng_states")
        exact = bool(states) and len(states) == self.dist.world_size
        if exact:  # last: whatever building the run drew, epoch start_epoch draws what it drew uninterrupted
            set_rng_state(states[self.dist.rank])
        else:
            self.warn(f"warning: --resume {path}: " + ("no random-generator state saved (an older checkpoint)"
                                                       if not states else f"random-generator states of {len(states)} "
                                                       f"processes saved, this run has {self.dist.world_size}")
                      + ": the run continues, but not exactly as it would have uninterrupted")
        changed = [f"--{k.replace('_', '-')} {saved_cfg[k]!r} -> {v!r}" for k, v in self.cfg.to_dict().items()
                   if k in saved_cfg and k != "resume" and saved_cfg[k] != v]
        best = (f"best val top-1 so far {self.best['selected_val_top1']:.2%} (epoch {self.best['epoch']})"
                if self.best else "no best epoch yet")
        self.log(f"resumed from {path} at epoch {self.start_epoch} ({best}"
                 f"{'; random-generator states restored' if exact else ''})"
                 + (f"; options changed: {', '.join(changed)}" if changed else ""))

    # -- the loop -----------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.main:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.main:
            print(message, file=sys.stderr, flush=True)

    def note_bad_images(self, bad, *, enforce: bool = True, split: str = "training") -> None:
        """Record unreadable images of the ``split`` (``(path, reason)`` pairs; each new one logged once) and,
        with ``enforce``, raise the clear error once more than ``--max-bad-images`` were met."""
        for path, reason in bad:
            if path in self.bad_images:
                continue
            reason = str(reason)
            if reason.startswith(f"{path}: "):
                reason = reason[len(path) + 2:]
            self.bad_images[path] = reason
            self.warn(f"warning: skipped unreadable {split} image {path} ({reason}); {len(self.bad_images)} "
                      f"skipped so far, at most {self.cfg.max_bad_images} (--max-bad-images)")
        if enforce and self.bad_images:
            check_bad_images(len(self.bad_images), self.cfg.max_bad_images, example=next(iter(self.bad_images)))

    def run(self) -> dict:
        """Train the remaining epochs, then evaluate ``best.pt`` on the test split; returns its metrics."""
        if self.start_epoch > self.cfg.epochs:  # before any file is written: a no-op would claim a best.pt
            unlock_run_folder(self.cfg.out)
            raise ValueError(f"--resume {self.cfg.resume}: the run has trained its {self.start_epoch - 1} epochs "
                             f"already; pass --epochs N (more than {self.start_epoch - 1}) to train on")
        failed = True
        try:
            self.begin()
            for epoch in range(self.start_epoch, self.cfg.epochs + 1):
                if self.run_epoch(epoch):
                    self.log(f"early stopping: no better validation top-1 for {self.cfg.early_stopping} epochs")
                    break
            result = self.test_best()
            failed = False
        except BaseException:
            if self.writer is not None:  # its queued events go into this run's tensorboard/, not the one put back
                self.writer.close()
                self.writer = None
            if self.main and (back := restore_set_aside(self.cfg.out)):
                self.warn(f"{self.cfg.out}: the run that --force was replacing is back ({', '.join(back)})")
            raise
        finally:
            self.finish(failed=failed)
        return result if self.main else {}

    def begin(self) -> None:
        self.config_pending = False
        if self.main:
            set_aside(self.cfg.out, self.replaced)
            # A resumed run writes its options over a config.yaml with its first checkpoint: one that fails before
            # leaves the folder's config.yaml the recipe of the last.pt that is still there
            self.config_pending = bool(self.cfg.resume) and os.path.isfile(os.path.join(self.cfg.out, CONFIG_FILE))
            if not self.config_pending:
                self.cfg.save_yaml(os.path.join(self.cfg.out, CONFIG_FILE))
            start_log(self.cfg.out, self.history)
        self.writer = open_tensorboard(self.cfg.out) if self.cfg.tensorboard and self.main else None

    def run_epoch(self, epoch: int) -> bool:
        """Train, validate, schedule and checkpoint one epoch; returns whether to stop early."""
        start = time.time()
        if self.unfreezer is not None:
            opened = self.unfreezer.apply(epoch - 1)
            if opened:
                self.log(f"epoch {epoch}: unfroze {', '.join(opened)}")
                if self.dist.enabled:
                    self._wrap()
        train_loss = self.train_one_epoch(epoch)
        check_in_step(self.model, self.dist)
        metrics = self.evaluate_epoch(epoch, train_loss, time.time() - start)
        return bool(broadcast(self.end_of_epoch(epoch, metrics, self.writer), self.dist))

    def finish(self, *, failed: bool = False) -> None:
        """Close the run. ``failed``: leave without the closing barrier, whose other ranks may be waiting in a
        collective call that this rank will never make (rank 0 failing in a step of its own, a checkpoint
        write on a full disk, hung all of them, silently): this process exits with its error, and torchrun
        then stops the others."""
        if self.writer is not None:
            self.writer.close()
        if self.main:
            unlock_run_folder(self.cfg.out)
        if not failed:
            barrier(self.dist)
            shutdown(self.dist)

    def train_one_epoch(self, epoch: int) -> float:
        cfg = self.cfg
        self.net.train()
        if self.unfreezer is not None:
            self.unfreezer.set_train_mode()
        self.train_loader.sampler.set_epoch(epoch)  # EpochSampler: the data order and the augmentation seeds
        total, seen = 0.0, 0
        met = []  # unreadable images this process met this epoch
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and self.main),
                   mininterval=1.0)
        for images, labels, bad in bar:
            if bad:  # one process: the log line and the --max-bad-images error at once; DDP: all ranks below
                met += bad
                self.note_bad_images(bad, enforce=not self.dist.enabled)
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
            # refresh=False: drawn at the bar's own interval (plain lines every 30 s off a terminal), not every step
            bar.set_postfix(loss=f"{total / seen:.4f}", lr=f"{self.schedule.lr:.2e}", refresh=False)
        if self.dist.enabled:  # every rank learns what the others met (rank 0 logs; all decide on the cap alike)
            self.note_bad_images([b for rank_bad in gather(met, self.dist) for b in rank_bad], enforce=False)
        return all_mean(total / max(1, seen), self.dist, self.device if self.device.type == "cuda" else
                        torch.device("cpu"))

    def evaluate_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict | None:
        """Rank 0 evaluates the validation split (the model and, with --ema, the EMA weights); never the test split."""
        if not self.main:
            return None
        metrics = {"epoch": epoch, "train_loss": train_loss}
        if self.val_loader is not None:
            bad: list = []
            probs, labels = predict(self.model, self.val_loader, self.spec, device=self.device,
                                    progress=self.cfg.progress, desc="validate", bad=bad)
            metrics.update(val_loss=nll(probs, labels), val_top1=topk_accuracy(probs, labels, 1),
                           val_top5=topk_accuracy(probs, labels, 5))
            if self.ema is not None:
                ema_probs, _ = predict(self.ema.module, self.val_loader, self.spec, device=self.device,
                                       progress=self.cfg.progress, desc="validate EMA", bad=bad)
                metrics.update(val_loss_ema=nll(ema_probs, labels), val_top1_ema=topk_accuracy(ema_probs, labels, 1),
                               val_top5_ema=topk_accuracy(ema_probs, labels, 5))
            self.note_bad_images(bad, enforce=False, split="validation")
        metrics["lr"] = self.schedule.lr
        metrics["seconds"] = seconds + 0.0
        return metrics

    def end_of_epoch(self, epoch: int, metrics: dict | None, writer) -> bool:
        """Choose, schedule, checkpoint, log; returns whether to stop early (rank 0 decides)."""
        use_ema, score, error = False, None, None
        if self.main:
            if self.val_loader is not None:  # model or EMA, whichever validates better; then best.pt if better
                model_score = (metrics["val_top1"], metrics["val_loss"])
                ema_score = (metrics.get("val_top1_ema"), metrics.get("val_loss_ema"))
                use_ema = self.ema is not None and _better(ema_score, model_score)
                chosen = ema_score if use_ema else model_score
                metrics.update(selected_val_top1=chosen[0], selected_val_loss=chosen[1])
                score = chosen[0]
            else:  # nothing to choose on: the last epoch, EMA weights when kept; plateau follows the training loss
                use_ema = self.ema is not None
                score = -metrics["train_loss"]
            metrics["weights"] = "ema" if use_ema else "model"
            metrics["bad_images"] = len(self.bad_images)
            if len(self.bad_images) > self.cfg.max_bad_images:
                try:
                    check_bad_images(len(self.bad_images), self.cfg.max_bad_images,
                                     example=next(iter(self.bad_images)))
                except ValueError as e:
                    error = str(e)
        score, error = broadcast((score, error), self.dist)
        if error:
            raise ValueError(error)
        self.schedule.step_epoch(score)
        rng_states = gather(rng_state(), self.dist)  # every rank's, for an exact --resume (a collective call)
        if not self.main:
            return False
        if self.val_loader is not None:
            improved = _better((metrics["selected_val_top1"], metrics["selected_val_loss"]),
                               (self.best["selected_val_top1"], self.best["selected_val_loss"])
                               if self.best else None)
        else:
            improved = True
        self.history.append(metrics)
        append_log(self.cfg.out, metrics)
        if self.val_loader is not None:
            ema_txt = f", EMA val top-1 {metrics['val_top1_ema']:.2%}" if self.ema is not None else ""
            text = (f"val loss {metrics['val_loss']:.4f}, val top-1 {metrics['val_top1']:.2%}, "
                    f"val top-5 {metrics['val_top5']:.2%}{ema_txt}{' (best so far)' if improved else ''}")
        else:
            text = "no validation split"
        bad_txt = f", {len(self.bad_images)} unreadable training images skipped" if self.bad_images else ""
        self.log(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, {text}{bad_txt} "
                 f"({metrics['seconds']:.0f} s)")
        if writer is not None:
            add_scalars(writer, metrics, epoch)
        stop = self.stopper.step(score) if self.stopper is not None else False
        if improved:  # best.pt first: last.pt then records a best.pt that exists
            self.best = dict(metrics)
            weights = self.ema.module if use_ema else self.model
            self._save(os.path.join(self.cfg.out, BEST_CHECKPOINT), epoch, metrics, weights=weights, training_state=False)
        self._save(os.path.join(self.cfg.out, LAST_CHECKPOINT), epoch, metrics, weights=self.model, training_state=True,
                   rng_states=rng_states)
        drop_set_aside(self.cfg.out)  # the new run has its checkpoints: the one --force replaced goes
        if self.config_pending:
            self.cfg.save_yaml(os.path.join(self.cfg.out, CONFIG_FILE))
            self.config_pending = False
        return stop

    def test_best(self) -> dict:
        """Rank 0 evaluates ``best.pt`` on the test split, once: ``RUN/test_metrics.json``, the log and
        ``best.pt``'s metrics (``test_*``) say so. Returns best.pt's metrics with the test numbers."""
        if not self.main:
            return {}
        path = os.path.join(self.cfg.out, BEST_CHECKPOINT)
        if not os.path.isfile(path):
            self.log("no best.pt (no epoch trained): the test split is not evaluated")
            return dict(self.best)
        spec, state_dict, ckpt = load_checkpoint(path)
        model = spec.build()
        model.load_state_dict(state_dict)
        model.to(self.device)
        loader = DataLoader(self.test_ds, batch_size=self.cfg.batch_size * 2, shuffle=False,
                            collate_fn=collate_readable, generator=torch.Generator().manual_seed(self.cfg.seed),
                            **self.loader_kwargs)
        unreadable: list = []
        probs, labels = predict(model, loader, spec, device=self.device, progress=self.cfg.progress, desc="test",
                                bad=unreadable)
        for image, reason in unreadable:  # left out of the numbers, named here and in test_metrics.json
            self.warn(f"warning: test image {image} left out: {reason}")
        test = {"test_loss": nll(probs, labels), "test_top1": topk_accuracy(probs, labels, 1),
                "test_top5": topk_accuracy(probs, labels, 5), "test_images": len(labels)}
        metrics = {**{k: v for k, v in dict(ckpt.get("metrics") or {}).items() if not k.startswith("test_")}, **test}
        ckpt["metrics"] = metrics
        write_atomically(path, ckpt)  # best.pt carries its test numbers (export copies them into export.json)
        chosen = (f"chosen on the validation split, val top-1 {metrics['selected_val_top1']:.2%}"
                  if "selected_val_top1" in metrics else "the last epoch (no validation split)")
        write_test_metrics(self.cfg.out, {
            "split": "test", "data": self.splits.test_name, "images": len(labels),
            "top1": test["test_top1"], "top5": test["test_top5"], "loss": test["test_loss"],
            "checkpoint": os.path.abspath(path), "epoch": int(ckpt["epoch"]), "weights": metrics.get("weights"),
            "selected_on": {"split": self.selection["split"], "source": self.selection["source"],
                            "images": self.selection["images"], "val_top1": metrics.get("selected_val_top1"),
                            "val_loss": metrics.get("selected_val_loss")},
            "bad_training_images": sorted(self.bad_images), "unreadable_test_images": sorted(p for p, _ in unreadable)})
        self.log(f"test split ({self.splits.test_name}, {len(labels)} images"
                 f"{f' ({len(unreadable)} unreadable left out)' if unreadable else ''}, evaluated once, at the end): "
                 f"top-1 {test['test_top1']:.2%}, top-5 {test['test_top5']:.2%}, loss {test['test_loss']:.4f} "
                 f"with best.pt (epoch {ckpt['epoch']}, {metrics.get('weights')} weights, {chosen}) "
                 f"-> {os.path.join(self.cfg.out, TEST_METRICS_FILE)}")
        self.best = metrics
        return metrics

    # -- files ----------------------------------------------------------------------------------------
    def _save(self, path: str, epoch: int, metrics: dict, *, weights: nn.Module, training_state: bool,
              rng_states: list | None = None) -> None:
        extra = {"epoch": epoch, "config": self.cfg.to_dict(), "best": self.best, "history": self.history,
                 "selection": self.selection}
        if training_state:  # what --resume needs; best.pt stays a lean deployable checkpoint
            extra.update(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                         scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                         ema_state_dict=self.ema.state_dict() if self.ema is not None else None,
                         early_stopping=self.stopper.state_dict() if self.stopper is not None else None,
                         rng_states=rng_states,
                         sampler_generator=None if self.sampler_generator is None else
                         self.sampler_generator.get_state(),
                         bad_images=[[p, r] for p, r in self.bad_images.items()])
        save_checkpoint(path, self.spec, weights, metrics=metrics, extra=extra)


def train(cfg: TrainConfig) -> dict:
    """Train one run; returns ``best.pt``'s metrics: its epoch's validation numbers and the final test
    split's (``test_*``) (rank 0; other ranks get ``{}``)."""
    return Trainer(cfg.validate()).run()
