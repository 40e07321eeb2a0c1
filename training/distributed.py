"""Data-parallel training under ``torchrun`` (DistributedDataParallel), and nothing of our own.

``torchrun --nproc-per-node N -m training train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; one
process per GPU (NCCL) or per CPU share (gloo). Multi-node: the same command on every node with
``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint``. Rank 0 alone logs, evaluates and checkpoints;
every rank sees ``1/N`` of each epoch through :class:`~torch.utils.data.DistributedSampler`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .runtime import check_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if info.enabled and device.startswith("cuda:"):  # every rank on that one GPU: NCCL fails, or they share it
        raise ValueError(f"--device {device} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda "
                         "(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    check_device(device)
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda:")
    if device == "auto" or (device == "cuda" and info.enabled):
        dev = torch.device(f"cuda:{info.local_rank}" if cuda and info.enabled else ("cuda" if cuda else "cpu"))
    else:
        dev = torch.device(device)
    if info.enabled and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast(value, info: DistInfo):
    """Rank 0's Python value on every rank (e.g. the epoch's test metric, the stop decision)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(value: float, info: DistInfo, device: torch.device = torch.device("cpu")) -> float:
    """Mean of a float over all ranks (e.g. the training loss)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def gather(value, info: DistInfo) -> list:
    """Every rank's Python value, in rank order, on every rank (``[value]`` for one process): the RNG
    states that ``last.pt`` keeps per rank, the unreadable images each rank met."""
    if not info.enabled:
        return [value]
    box = [None] * info.world_size
    dist.all_gather_object(box, value)
    return box


def check_in_step(model: torch.nn.Module, info: DistInfo) -> None:
    """Raise when the processes' copies of ``model`` are no longer the same (a parameter that DDP does not
    average, e.g. one trained while DDP knew it as frozen). Every rank compares a float64 sum per parameter
    with rank 0's; a collective call, once an epoch."""
    if not info.enabled:
        return
    with torch.no_grad():  # compared bit for bit: a NaN the copies share is the same, not "apart"
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu().view(torch.int64)
    ranks = gather(sums, info)
    names = [n for n, _ in model.named_parameters()]
    apart = [names[i] for i in torch.nonzero(torch.stack(ranks).ne(ranks[0]).any(0)).flatten().tolist()]
    if apart:
        raise RuntimeError(f"the {info.world_size} processes' copies of the model differ in {len(apart)} "
                           f"parameters after this epoch, e.g. {apart[0]}: their gradients were not averaged")
