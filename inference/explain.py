"""Explanations: occlusion sensitivity of the top-1 class, computed with batched forwards through any backend.

For each image (uint8 ``(3, S, S)``, what the model sees), the plain forward gives the top-1 class ``c``
and its probability ``p``. The image is cut into ``grid x grid`` cells (cell ``(r, k)`` covers rows
``edges[r]:edges[r + 1]`` and the same columns, ``edges`` = :func:`cell_edges`: patch = stride = ``S / grid``,
no overlap); each cell in turn is filled with the image's mean colour (``fill="mean"``) or mid grey and the
image run again. The cell's attribution is ``p`` minus ``c``'s probability with that cell hidden: positive,
the cell supports ``c``; near zero, it does not matter; negative, hiding it makes ``c`` more likely. The
``grid**2`` views of all images go through ``forward`` (``uint8 NCHW -> logits or probabilities``, as every
runtime of ``inference.backends`` and the eager model are called) in forwards of at most ``max_views``, so
one image costs ``grid**2 + 1`` views, bounded by :data:`MAX_GRID`.

Also here: the PNG heatmap overlay (Pillow). Answering one explanation request (its options, limits and
body in its protocol) is :mod:`inference.explain_requests`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, ImageOps

from inference.backends import GRAPH_OUTPUTS, chunked

DEFAULT_GRID = 7                 # 49 occluded views per image
MAX_GRID = 16                    # at most 256 occluded views per image
DEFAULT_VIEWS_PER_FORWARD = 64
FILLS = ("mean", "grey")         # what an occluded cell is filled with: the image's mean colour, or 128 grey
DEFAULT_FILL = "mean"
OUTPUTS = tuple(o for o in GRAPH_OUTPUTS if o != "topk")  # every class's score: a top-k graph cannot be explained
GREY = 128
METHOD = "occlusion"


@dataclass(frozen=True)
class Occlusion:
    """The explanations of ``N`` images: top-1 class, its probability, the ``(N, grid, grid)`` maps."""
    indices: torch.Tensor        # (N,) int64
    probabilities: torch.Tensor  # (N,) float32
    maps: torch.Tensor           # (N, grid, grid) float32: drop of the top-1 probability per occluded cell


def cell_edges(size: int, grid: int) -> list[int]:
    """The ``grid + 1`` cell boundaries along a side of ``size`` pixels (cells differ by at most a pixel)."""
    return [round(k * size / grid) for k in range(grid + 1)]


def _probabilities(out, output: str) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        raise ValueError("occlusion needs every class's score: this graph returns only a top-k (values, indices)")
    out = out.float()
    return out.softmax(-1) if output == "logits" else out


def _fills(images: torch.Tensor, fill: str) -> torch.Tensor:
    """``(N, C, 1, 1)`` fill colour per image."""
    if fill == "mean":
        return images.float().mean(dim=(2, 3), keepdim=True).round().to(images.dtype)
    return torch.full((*images.shape[:2], 1, 1), GREY, dtype=images.dtype, device=images.device)


def occlusion(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, grid: int = DEFAULT_GRID,
              fill: str = DEFAULT_FILL, max_views: int = DEFAULT_VIEWS_PER_FORWARD, output: str = "logits") -> Occlusion:
    """Occlusion sensitivity of each image's top-1 class; ``images``: uint8 ``(N, C, H, W)``.

    ``forward`` is called on at most ``max_views`` images at a time: ``ceil(N / max_views)`` plain
    forwards, then ``ceil(N * grid**2 / max_views)`` forwards of occluded views (built chunk by chunk,
    so memory is bounded by ``max_views`` images too).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"occlusion needs a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= min(MAX_GRID, h, w):
        raise ValueError(f"grid must be an integer from 1 to {min(MAX_GRID, h, w)} for {h}x{w} images, got {grid!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if isinstance(max_views, bool) or not isinstance(max_views, int) or max_views < 1:
        raise ValueError(f"max_views must be a positive integer, got {max_views!r}")
    rows, cols = cell_edges(h, grid), cell_edges(w, grid)
    cells, total = grid * grid, n * grid * grid
    with torch.no_grad():
        base = _probabilities(chunked(forward, images, step=max_views), output).cpu()
        top = base.argmax(1)
        p0 = base.gather(1, top[:, None])[:, 0]
        fills = _fills(images, fill)
        drops = torch.empty(total, dtype=torch.float32)
        for start in range(0, total, max_views):
            ids = range(start, min(total, start + max_views))
            owners = [k // cells for k in ids]
            views = images[owners]  # advanced indexing: a copy
            for j, k in enumerate(ids):
                r, c = divmod(k % cells, grid)
                views[j, :, rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = fills[owners[j]]
            probs = _probabilities(forward(views), output).cpu()
            drops[start:start + len(ids)] = p0[owners] - probs[torch.arange(len(ids)), top[owners]]
    return Occlusion(top, p0, drops.view(n, grid, grid))


def render_overlay(image: torch.Tensor, attribution: torch.Tensor, *, alpha: float = 0.6) -> bytes:
    """The PNG of ``image`` (uint8 ``(3, H, W)``) under its heatmap: the positive attributions scaled to
    their maximum, upsampled (bilinear) to ``H x W``, coloured blue -> yellow -> red and blended in
    proportion to their value (cells that do not support the class leave the image as it is)."""
    rgb = Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy())
    a = attribution.detach().float().cpu().clamp(min=0)
    peak = float(a.max()) if a.numel() else 0.0
    heat = (a / peak * 255).round().to(torch.uint8) if peak > 0 else torch.zeros_like(a, dtype=torch.uint8)
    heat_image = Image.fromarray(heat.numpy()).resize(rgb.size, Image.Resampling.BILINEAR)
    coloured = ImageOps.colorize(heat_image, black="blue", mid="yellow", white="red")
    mask = heat_image.point(lambda v: round(v * alpha))
    buf = io.BytesIO()
    Image.composite(coloured, rgb, mask).save(buf, format="PNG")
    return buf.getvalue()
