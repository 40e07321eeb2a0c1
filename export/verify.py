"""Parity of exported graphs against the eager model on real images."""
from __future__ import annotations

import random
import time

import torch
from torch import nn

from handlers.backends import load_backend
from training.data import scan_image_folder
from training.images import read_image_file
from training.presets import EvalPreset, normalize

# Tolerances of the fp32 graphs against eager fp32, in logit units relative to the logits' scale.
FP32_RTOL = 1e-4
MIN_TOP1_AGREEMENT = 0.995


def sample_images(data: str, spec, *, count: int = 64, seed: int = 0) -> torch.Tensor:
    """``count`` images of an ImageFolder tree, evenly mixed over classes, as a uint8 eval batch."""
    _, paths, _ = scan_image_folder(data)
    paths = random.Random(seed).sample(paths, min(count, len(paths)))
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    return preset.batch([read_image_file(p) for p in paths])


@torch.no_grad()
def compare(model: nn.Module, spec, files: dict[str, str], images: torch.Tensor) -> dict[str, dict]:
    """Run eager and every exported file on ``images``; return per-format parity numbers."""
    reference = model.eval()(normalize(images, mean=spec.mean, std=spec.std))
    scale = reference.abs().max().item()
    results = {}
    for fmt, path in files.items():
        backend = load_backend(path)
        backend(images[:2])  # warm-up
        start = time.perf_counter()
        logits = backend(images)
        ms = (time.perf_counter() - start) * 1000 / len(images)
        diff = (logits - reference).abs()
        results[fmt] = {
            "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "max_rel_diff": diff.max().item() / max(scale, 1e-12),
            "top1_agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
            "images": len(images),
            "ms_per_image": ms,
        }
    return results


def check(results: dict[str, dict], *, rtol: float = FP32_RTOL, min_agreement: float = MIN_TOP1_AGREEMENT) -> None:
    bad = [f"{fmt}: max relative logit difference {r['max_rel_diff']:.2e} > {rtol:.0e} or top-1 agreement "
           f"{r['top1_agreement']:.3f} < {min_agreement}" for fmt, r in results.items()
           if r["max_rel_diff"] > rtol or r["top1_agreement"] < min_agreement]
    if bad:
        raise AssertionError("exported graphs disagree with the eager model:\n" + "\n".join(bad))


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'format':<12} {'max |diff|':>11} {'mean |diff|':>12} {'rel':>9} {'top-1 agree':>12} {'ms/img':>8}"]
    for fmt, r in results.items():
        lines.append(f"{fmt:<12} {r['max_abs_diff']:>11.2e} {r['mean_abs_diff']:>12.2e} {r['max_rel_diff']:>9.1e} "
                     f"{r['top1_agreement']:>12.3f} {r['ms_per_image']:>8.3f}")
    return "\n".join(lines)
