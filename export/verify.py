"""Parity and accuracy of exported graphs against the eager model, on real images.

Tolerances (explicit, and tested):

| precision | max logit difference / logit scale | top-1 agreement | top-1 accuracy drop |
|---|---|---|---|
| fp32 | 1e-4 (1e-3 on CUDA: TF32 convolutions) | >= 99.5% | -- |
| fp16 | 1e-2 | >= 99.5% | <= --max-drop points |
| bf16 | 5e-2 | >= 99.5% | <= --max-drop points |
| int8 | (reported) | >= --min-agreement (99%) on labelled data | <= --max-drop points |

INT8 graphs are accuracy-controlled before this gate (:mod:`export.int8`, on the validation split). The
images are :mod:`export.image_sets`'; the timing, :func:`export.speed.ms_per_image`.
"""
from __future__ import annotations

import torch

from inference.backends import chunked

from .speed import ms_per_image

RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": None}
CUDA_FP32_RTOL = 1e-3  # cuDNN and ONNX Runtime's CUDA EP use TF32 for fp32 convolutions
MIN_TOP1_AGREEMENT = 0.995
DEFAULT_MAX_DROP = 0.5  # top-1 accuracy points
DEFAULT_MIN_INT8_AGREEMENT = 0.99  # share of images whose INT8 top-1 is fp32's


def run_backend(backend, images: torch.Tensor, *, chunk: int = 64):
    """All outputs over ``images`` in chunks (concatenated), plus ms per image at batch 8
    (:func:`ms_per_image` over 0.2 s, at torch's current thread count)."""
    for _ in range(3):  # warm-up (TorchScript's profiling executor optimizes after a few runs)
        backend(images[:8])
    ms = ms_per_image(backend, images[:8], threads=torch.get_num_threads())
    out = chunked(backend, images, step=chunk)
    if isinstance(out, tuple):
        return tuple(o.cpu() for o in out), ms
    return out.cpu().float(), ms


def _topk_sets(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=1).indices.sort(1).values


def compare(output, reference: torch.Tensor, *, kind: str, labels: torch.Tensor | None, k: int) -> dict:
    """Numbers for one variant. ``reference``: eager logits (``logits``/``topk``) or eager probabilities
    (``probabilities``). ``output``: the variant's logits/probabilities, or ``(values, indices)``."""
    if kind == "topk":
        values, indices = output
        ref_probs = reference.float().softmax(-1)
        ref_values, ref_indices = ref_probs.topk(values.shape[1], dim=1)
        diff = (values.float() - ref_values).abs()
        top1 = indices[:, 0]
        result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                  "max_rel_diff": diff.max().item() / max(ref_values.abs().max().item(), 1e-12),
                  "topk_agreement": (indices.sort(1).values == ref_indices.sort(1).values).all(1).float().mean().item()}
    else:
        diff = (output.float() - reference.float()).abs()
        top1 = output.argmax(1)
        kk = min(k, output.shape[1])
        result = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                  "max_rel_diff": diff.max().item() / max(reference.abs().max().item(), 1e-12),
                  "topk_agreement": (_topk_sets(output.float(), kk) == _topk_sets(reference.float(), kk)).all(1)
                  .float().mean().item()}
    result["top1_agreement"] = (top1 == reference.argmax(1)).float().mean().item()
    result["accuracy"] = (top1 == labels).float().mean().item() if labels is not None else None
    return result


def effective_precision(precision: str, *, hint: str | None = None) -> str:
    """The precision a graph really runs at: OpenVINO's bf16 hint lowers an fp32 graph to bf16 (on
    CPUs with bf16 instructions), but leaves fp16/bf16 and INT8 graphs at their own precision."""
    return "bf16" if hint == "bf16" and precision == "fp32" else precision


def problems(precision: str, result: dict, *, reference_accuracy: float | None, max_drop: float,
             min_agreement: float = DEFAULT_MIN_INT8_AGREEMENT, cuda: bool = False) -> list[str]:
    """What makes a variant unacceptable (empty list: acceptable). INT8's agreement rule applies on
    labelled data (a speed-only INT8 of random weights on random images has no answers worth keeping)."""
    out = []
    if precision == "int8" and result.get("accuracy") is not None and result["top1_agreement"] < min_agreement:
        out.append(f"top-1 agreement with fp32 {result['top1_agreement']:.2%} < the gate's {min_agreement:.1%} "
                   "(export --min-agreement)")
    rtol = CUDA_FP32_RTOL if cuda and precision == "fp32" else RTOL[precision]
    if rtol is not None and result["max_rel_diff"] > rtol:
        out.append(f"max relative difference {result['max_rel_diff']:.1e} > {rtol:.0e}")
    if precision != "int8" and result["top1_agreement"] < MIN_TOP1_AGREEMENT:
        out.append(f"top-1 agreement {result['top1_agreement']:.2%} < {MIN_TOP1_AGREEMENT:.1%}")
    if precision != "fp32" and result.get("accuracy") is not None and reference_accuracy is not None:
        drop = (reference_accuracy - result["accuracy"]) * 100
        result["accuracy_change_points"] = round(-drop, 4) + 0.0  # no "-0.0"
        if drop > max_drop:
            out.append(f"top-1 accuracy drops {drop:.2f} points > the gate's {max_drop} (export --max-drop)")
    return out


def format_table(rows: dict[str, dict], *, reference_accuracy: float | None = None) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.2%}"
    lines = [f"{'variant':<24} {'max|diff|':>9} {'mean|diff|':>10} {'rel':>8} {'top1 agr':>9} {'topk agr':>9} "
             f"{'accuracy':>9} {'ms/img':>7}"]
    if reference_accuracy is not None:
        lines.append(f"{'eager fp32':<24} {'-':>9} {'-':>10} {'-':>8} {'-':>9} {'-':>9} {pct(reference_accuracy):>9} {'-':>7}")
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"{name:<24} {r['error']}")
            continue
        lines.append(f"{name:<24} {r['max_abs_diff']:>9.2e} {r['mean_abs_diff']:>10.2e} {r['max_rel_diff']:>8.1e} "
                     f"{pct(r['top1_agreement']):>9} {pct(r['topk_agreement']):>9} {pct(r.get('accuracy')):>9} "
                     f"{r['ms_per_image']:>7.3f}")
    return "\n".join(lines)
