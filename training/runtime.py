"""The execution settings of a run: the device, the autocast precision (:data:`AMP_MODES`) and seeding."""
from __future__ import annotations

import random

import numpy as np
import torch

AMP_MODES = ("auto", "none", "bf16", "fp16")
_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, none on CPU (most CPUs lack fast bf16)."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {amp!r}; choose one of {AMP_MODES}")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _AMP_DTYPES[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
