"""The configurations ``make bench`` compares, and the ONE worker x thread grid every side is searched over.

A configuration (:class:`Config`) is a handler, a graph variant, a TTA mode and handler settings; its
split (workers x threads per worker) is not fixed here: each configuration that ``searched`` is
served at every point of :func:`search_grid` in a short search phase and keeps its best, stock and
ours alike, so that neither side is measured at a split chosen for it by hand. A configuration with
``split_of`` takes the split chosen for that one (the TTA configurations use ``ours_fp32``'s, or
``ours_ov_bf16``'s for its flip, so that their cost is measured against the same backend in the same split).

``stock`` is TorchServe's built-in ``image_classifier`` (eager PyTorch; its threads can only be set
through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, which :meth:`Config.env_for` sets to the threads of
the split); every ``ours_*`` is this project's handler with one exported graph (the split goes into
its ``model-config.yaml``: ``minWorkers`` and ``handler.threads``, which also sizes its decode pool).
All of them serve batch 8 (:data:`BATCH`) with a 10 ms batch delay.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

BATCH = 8            # TorchServe batchSize of every configuration, and the in-process limit's batch
MAX_BATCH_DELAY = 10  # ms


@dataclass(frozen=True)
class Split:
    """How a configuration uses the cores: ``workers`` processes with ``threads`` threads each."""
    workers: int
    threads: int

    def __str__(self) -> str:
        return f"{self.workers}x{self.threads}"


def search_grid(cores: int | None = None) -> list[Split]:
    """Every workers x threads whose product is all the cores or half of them (1x1, 1x2, 2x1 on 2
    cores: half leaves a core to the Java frontend and the load generator, which share the machine)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores)
    products = sorted({max(1, cores // 2), cores})
    return [Split(w, p // w) for p in products for w in range(1, p + 1) if p % w == 0]


def positive_ints(text: str, option: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``; anything else is a ``UsageError`` naming ``option``."""
    from inference.cli import UsageError
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{option} must be comma-separated integers >= 1, got {text!r}")
    return values


def parse_grid(text: str) -> list[Split]:
    """``"1x1,1x2,2x1"`` -> splits; raises ValueError with the bad item named."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            w, t = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad grid point {item!r}: write WORKERSxTHREADS, e.g. 2x1") from None
        if w < 1 or t < 1:
            raise ValueError(f"bad grid point {item!r}: workers and threads must be >= 1")
        out.append(Split(w, t))
    if not out:
        raise ValueError("the grid is empty")
    return list(dict.fromkeys(out))


@dataclass
class Config:
    name: str
    kind: str                        # stock | ours
    variant: str = "onnx"            # the export variant (export.json) ours serves; stock: eager
    tta: str = "none"
    adaptive: bool = False
    searched: bool = True            # served at every grid point in the search phase
    split_of: str | None = None      # or: take the split chosen for this configuration
    handler: dict = field(default_factory=dict)   # extra model-config.yaml handler settings

    def env_for(self, split: Split) -> dict:
        """Environment of the TorchServe serving this configuration at ``split``."""
        if self.kind == "stock":  # the built-in handler sets no threads: torch reads these
            return {"OMP_NUM_THREADS": str(split.threads), "MKL_NUM_THREADS": str(split.threads)}
        return {}

    @property
    def uses_tta(self) -> bool:
        return self.tta != "none"


CONFIGS: dict[str, Config] = {c.name: c for c in [
    Config("stock", "stock", variant="eager"),
    Config("ours_fp32", "ours", "onnx"),
    Config("ours_fp32_flip", "ours", "onnx", tta="flip", searched=False, split_of="ours_fp32"),
    Config("ours_fp32_adaptive", "ours", "onnx", tta="flip", adaptive=True, searched=False, split_of="ours_fp32"),
    Config("ours_ov_f32", "ours", "openvino", handler={"openvino_precision": "f32"}),
    # bf16 where the CPU has it (AVX-512-bf16/AMX), else f32: OpenVINO's own default on such CPUs
    Config("ours_ov_bf16", "ours", "openvino", handler={"openvino_precision": "auto"}),
    # flip TTA on that graph: what TTA costs on the variant one would deploy on such a CPU (its split)
    Config("ours_ov_bf16_flip", "ours", "openvino", tta="flip", searched=False, split_of="ours_ov_bf16",
           handler={"openvino_precision": "auto"}),
    Config("ours_ov_int8", "ours", "openvino-int8"),
]}
