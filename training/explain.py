"""``python -m training explain``: the occlusion heatmap of one image's top-1 class, offline, as a PNG.

The same computation and overlay as the server's ``/explanations`` (:mod:`inference.explain`), on the
eager model of a checkpoint: the image is read by the project's one decoder
(``inference.images.read_image_file``) and cut to the model's input by the evaluation preset (resize +
center crop, as ``evaluate`` does), and the model sees it normalized as the exported graphs do. The
defaults (grid, fill, views per forward) are the handler's, from :class:`inference.settings.HandlerSettings`.
"""
from __future__ import annotations

import os

from inference.atomic import write_bytes
from inference.explain import occlusion, render_overlay
from inference.images import read_image_file
from inference.settings import HandlerSettings
from inference.transforms import EvalPreset, normalize

from .checkpoint import load_model
from .runtime import pick_device


def explain_image(checkpoint: str | os.PathLike, image: str | os.PathLike, *, out: str | os.PathLike,
                  grid: int = HandlerSettings.explain_grid, fill: str = HandlerSettings.explain_fill,
                  views_per_forward: int = HandlerSettings.explain_views_per_forward,
                  device: str = "auto") -> dict:
    """Write the overlay PNG of ``image`` to ``out``; return the class, its probability and the grid."""
    if not os.path.isfile(image):
        raise FileNotFoundError(f"image not found: {image}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    spec, model = load_model(checkpoint)  # another file: ValueError (training.checkpoint.read_checkpoint)
    dev = pick_device(device)
    model.to(dev)
    preset = EvalPreset(crop_size=spec.input_size, resize_size=spec.resize_size)
    canvas = preset(read_image_file(os.fspath(image), min_side=preset.min_decode_side))[None].to(dev)
    if grid > spec.input_size:
        raise ValueError(f"--grid {grid} is larger than the model's input of {spec.input_size} pixels")
    result = occlusion(lambda x: model(normalize(x, mean=spec.mean, std=spec.std)), canvas, grid=grid, fill=fill,
                       max_views=views_per_forward, output="logits")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_bytes(path=out, data=render_overlay(canvas[0], result.maps[0]))
    index = int(result.indices[0])
    return {"class": spec.class_names[index], "index": index, "probability": float(result.probabilities[0]),
            "grid": result.maps[0].tolist(), "out": os.fspath(out), "size": spec.input_size}
