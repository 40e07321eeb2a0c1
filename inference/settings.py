"""The model's settings: one definition of every key of an archive's ``model-config.yaml``.

:class:`WorkerSettings` are TorchServe's own keys at the top level (batching, workers, timeout);
:class:`HandlerSettings` is the ``handler:`` section our handler reads. Each field carries its
default, its type (the annotation), its allowed values or range and its ``--help`` text, and
nothing else defines them: ``export archive`` writes ``model-config.yaml`` with :meth:`to_config`
and builds its command-line options with :func:`add_arguments`; the handler reads its section with
:meth:`HandlerSettings.from_config`, which refuses an unknown key or a bad value with a message that
names the key.
"""
from __future__ import annotations

import argparse
import logging
import math
import typing
from dataclasses import dataclass, field, fields

from inference.admission import DEFAULT_MAX_BATCH_PIXELS, DEFAULT_MAX_REQUEST_PIXELS, FULL_SIZE_PIXELS_PER_SLOT
from inference.backends import GRAPH_OUTPUTS, OPENVINO_PRECISIONS, PRECISIONS
from inference.cli import UsageError
from inference.decode_memory import DEFAULT_MAX_DECODE_BYTES
from inference.explain import DEFAULT_FILL, DEFAULT_GRID, DEFAULT_VIEWS_PER_FORWARD, FILLS, MAX_GRID
from inference.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS
from inference.requests import DEFAULT_MAX_IMAGES, DEFAULT_MAX_INFLATED_BYTES, DEFAULT_MAX_RESPONSE_BYTES
from inference.tta import (
    ADAPTIVE_METRICS,
    AGGREGATES,
    DEFAULT_ADAPTIVE_METRIC,
    DEFAULT_ADAPTIVE_THRESHOLD,
    DEFAULT_AGGREGATE,
    DEFAULT_SCALES,
    GRAPH_TTA_MODES,
    TTA_MODES,
    view_problem,
)


class SettingsError(UsageError, ValueError):
    """A bad ``model-config.yaml``: the message names the key."""


def _opt(default, help: str, *, choices: tuple | None = None, minimum: float | None = None,
         maximum: float | None = None, cli: bool = True, yaml_key: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
                                            "cli": cli, "yaml_key": yaml_key})


def _check(name: str, hint, meta, value, where: str):
    """``value`` coerced to the field's annotated type ``hint`` and checked against its choices and range."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise SettingsError(f"{where}.{name} is required ({meta['help']}; `python -m export archive` writes it)")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    bad = SettingsError(f"{where}.{name} must be {_describe(base)}, got {value!r}")
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise bad
    elif typing.get_origin(base) is tuple:  # tuple[float, ...]
        if not isinstance(value, (list, tuple)) or not value or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise bad
        value = tuple(float(v) for v in value)
    items = value if isinstance(value, tuple) else (value,)
    if base is float or typing.get_origin(base) is tuple:  # NaN passes every comparison: .nan turned guards off
        if not all(math.isfinite(v) for v in items):
            raise SettingsError(f"{where}.{name} must be a finite number, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise SettingsError(f"{where}.{name} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    for v in items:
        if meta["minimum"] is not None and v < meta["minimum"]:
            raise SettingsError(f"{where}.{name} must be >= {meta['minimum']}, got {value!r}")
        if meta["maximum"] is not None and v > meta["maximum"]:
            raise SettingsError(f"{where}.{name} must be <= {meta['maximum']}, got {value!r}")
    return value


def _describe(base) -> str:
    if typing.get_origin(base) is tuple:
        return "a non-empty list of numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))


class _Settings:
    """What both settings classes share: validation on construction, reading and writing YAML."""

    WHERE = "model-config.yaml"

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _check(f.metadata["yaml_key"] or f.name, hints[f.name], f.metadata,
                                                    getattr(self, f.name), self.WHERE))

    @classmethod
    def from_config(cls, section: dict | None):
        """Read a ``model-config.yaml`` mapping; unknown keys and bad values raise :class:`SettingsError`."""
        if section is not None and not isinstance(section, dict):
            raise SettingsError(f"{cls.WHERE} must be a mapping of key: value, got {type(section).__name__} "
                                f"{section!r:.60}")
        section = dict(section or {})
        known = {f.metadata["yaml_key"] or f.name: f.name for f in fields(cls)}
        unknown = sorted((k for k in section if k not in known and k not in cls.IGNORED), key=str)
        if unknown:
            raise SettingsError(f"{cls.WHERE}: unknown key(s) {', '.join(map(str, unknown))}; the known keys are "
                                f"{', '.join(known)}")
        settings = cls(**{known[k]: v for k, v in section.items() if k in known})
        problem = getattr(settings, "tta_problem", lambda: None)()
        if problem:  # an archive built before export refused it: it still loads
            logging.getLogger(__name__).warning("%s: %s", cls.WHERE, problem)
        return settings

    def to_config(self) -> dict:
        """The YAML mapping (keys in definition order; ``None`` values left out)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.metadata["yaml_key"] or f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class WorkerSettings(_Settings):
    """TorchServe's keys at the top of ``model-config.yaml`` (one worker count: min = max)."""

    WHERE: typing.ClassVar[str] = "model-config.yaml"
    IGNORED: typing.ClassVar[frozenset] = frozenset({"maxWorkers", "handler"})

    batch_size: int = _opt(8, "TorchServe batchSize (dynamic server-side batching)", minimum=1, yaml_key="batchSize")
    max_batch_delay: int = _opt(10, "TorchServe maxBatchDelay in ms", minimum=0, yaml_key="maxBatchDelay")
    workers: int = _opt(1, "minWorkers = maxWorkers", minimum=1, yaml_key="minWorkers")
    response_timeout: int = _opt(60, "TorchServe responseTimeout in s", minimum=1, yaml_key="responseTimeout")

    def to_config(self) -> dict:
        out = super().to_config()
        return {"minWorkers": out.pop("minWorkers"), "maxWorkers": self.workers, **out}

    @classmethod
    def of_model_config(cls, config: dict) -> "WorkerSettings":
        """These keys of a whole ``model-config.yaml`` checked (a hand-written ``minWorkers: two`` is a
        :class:`SettingsError` naming it); TorchServe's many other top-level keys and sections left to it."""
        keys = {f.metadata["yaml_key"] or f.name for f in fields(cls)}
        return cls.from_config({k: v for k, v in (config or {}).items() if k in keys})


@dataclass(frozen=True)
class HandlerSettings(_Settings):
    """The ``handler:`` section. The last six fields are facts of the graph, written by ``export archive``."""

    WHERE: typing.ClassVar[str] = "model-config.yaml handler"
    IGNORED: typing.ClassVar[frozenset] = frozenset()

    topk: int = _opt(5, "classes returned per image (clients may send X-Top-K or a topk field)", minimum=1)
    tta: str = _opt("flip", "test-time augmentation in the handler, all views in one forward (ignored for "
                    "onnx-tta and onnx-topk graphs)", choices=TTA_MODES)
    tta_scales: tuple[float, ...] = _opt(DEFAULT_SCALES, "scales of multi_scale TTA (comma-separated on the "
                                         "command line)", minimum=0.1, maximum=4.0)
    tta_aggregate: str = _opt(DEFAULT_AGGREGATE, "mean of the views' softmax, or softmax of their mean logits",
                              choices=AGGREGATES)
    adaptive_tta: bool = _opt(False, "plain forward first; TTA views only for images whose score is below "
                              "--adaptive-threshold")
    adaptive_metric: str = _opt(DEFAULT_ADAPTIVE_METRIC, "adaptive TTA's score: top-1 probability (confidence), or top-1 "
                                "minus top-2 (margin)", choices=ADAPTIVE_METRICS)
    adaptive_threshold: float = _opt(DEFAULT_ADAPTIVE_THRESHOLD, "below this score, TTA is applied", minimum=0.0, maximum=1.0)
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, "pixels of one image (from its header); larger: 413", minimum=1)
    max_request_pixels: int = _opt(DEFAULT_MAX_REQUEST_PIXELS, "decoded pixels of all images of one request; "
                                   "more: 413", minimum=1)
    max_batch_pixels: int | None = _opt(None, "decoded pixels a worker admits per batch; the requests beyond it "
                                        f"get 503 (retry). Unset: {DEFAULT_MAX_BATCH_PIXELS} on the CPU; on a GPU "
                                        f"(nvjpeg decodes JPEGs at full size) batchSize x {FULL_SIZE_PIXELS_PER_SLOT}"
                                        " if more", minimum=1)
    max_decode_bytes: int = _opt(DEFAULT_MAX_DECODE_BYTES, "memory the image decodes running at once in a worker may "
                                 "hold, estimated from each header and format; a decode past it waits its turn",
                                 minimum=1)
    max_aspect_ratio: float = _opt(DEFAULT_MAX_ASPECT_RATIO, "long side / short side of one image; beyond: 413",
                                   minimum=1.0)
    max_frames: int = _opt(DEFAULT_MAX_FRAMES, "frames of an animated image (only the first is used); more: 413",
                           minimum=1)
    max_images_per_request: int = _opt(DEFAULT_MAX_IMAGES, "images one request may carry (more: 413)", minimum=1)
    max_inflated_bytes: int = _opt(DEFAULT_MAX_INFLATED_BYTES, "a body sent compressed (Content-Encoding gzip or "
                                   "deflate) inflates to at most this many bytes (more: 413)", minimum=1)
    max_response_bytes: int = _opt(DEFAULT_MAX_RESPONSE_BYTES, "an answer longer than this is replaced by a 413 "
                                   "(set it to config.properties' max_response_size: TorchServe drops a worker, "
                                   "and its whole batch, on a longer one)", minimum=1024)
    max_forward_batch: int = _opt(256, "largest batch of views in one forward (larger ones are chunked)",
                                  minimum=1)
    threads: int = _opt(0, "intra-op threads per worker (0: OMP_NUM_THREADS, else cores / the model's live "
                        "workers, re-sized when their number changes)", minimum=0)
    threads_check_interval: float = _opt(2.0, "seconds between counts of the model's live workers when threads "
                                         "is 0 (0: count only at start-up)", minimum=0.0)
    openvino_precision: str = _opt("auto", "OpenVINO inference precision hint: auto = bf16 where the CPU has "
                                   "bf16 instructions", choices=OPENVINO_PRECISIONS)
    openvino_cpu_pinning: bool = _opt(False, "pin OpenVINO's inference threads to cores (OpenVINO's default; "
                                      "off here: pinned, every worker of a model takes the same first cores)")
    explain_grid: int = _opt(DEFAULT_GRID, "explanations: cells per side of the occlusion grid (grid^2 + 1 "
                             "forwards per image)", minimum=1, maximum=MAX_GRID)
    explain_fill: str = _opt(DEFAULT_FILL, "explanations: an occluded cell is filled with the image's mean colour or "
                             "mid grey", choices=FILLS)
    explain_views_per_forward: int = _opt(DEFAULT_VIEWS_PER_FORWARD, "explanations: occluded views per forward "
                                          "(also capped by --max-forward-batch)", minimum=1)
    explain_max_images: int = _opt(4, "explanations: images one explanation request may carry (more: 413)",
                                   minimum=1)
    explain_overlay: bool = _opt(False, "explanations carry overlay_png_base64 (the heatmap over the image) "
                                 "unless the request says otherwise (X-Explain-Overlay or an overlay field)")
    input_size: int = _opt(None, "the graph's input size in pixels", minimum=1, cli=False)
    resize_size: int | None = _opt(None, "shorter side before the center crop (default: input_size)", minimum=1,
                                   cli=False)
    graph_output: str = _opt("logits", "what the graph returns", choices=GRAPH_OUTPUTS, cli=False)
    graph_tta: str = _opt("none", "TTA inside the graph (graph_output: probabilities)", choices=("none", *GRAPH_TTA_MODES),
                          cli=False)
    graph_topk: int | None = _opt(None, "k of an in-graph top-k (graph_output: topk)", minimum=1, cli=False)
    precision: str = _opt("fp32", "the graph's precision", choices=PRECISIONS, cli=False)

    def __post_init__(self):
        super().__post_init__()
        if self.input_size and self.resize_size and self.resize_size < self.input_size:  # the crop would pad zeros
            raise SettingsError(f"{self.WHERE}.resize_size {self.resize_size} is smaller than input_size "
                                f"{self.input_size}: the center crop would pad the image with black")
        if self.graph_output == "topk" and self.graph_topk is None:
            raise SettingsError(f"{self.WHERE}.graph_topk is missing: graph_output topk needs the k the graph returns")
        batch = self.max_batch_pixels or DEFAULT_MAX_BATCH_PIXELS  # unset: at least the CPU's default
        if self.max_request_pixels > batch:
            # admission lets the first request of a batch in whatever the batch budget: max(request, batch) would rule
            raise SettingsError(f"{self.WHERE}.max_request_pixels {self.max_request_pixels} is more than "
                                f"max_batch_pixels {batch}{'' if self.max_batch_pixels else ' (its default)'}: one "
                                "request could take more than a whole batch's budget; lower max_request_pixels or "
                                "raise max_batch_pixels")

    def tta_problem(self) -> str | None:
        """Why the handler's TTA would run copies of one view (or, adaptive, nothing), or None: five_crop/ten_crop
        (and multi_scale with no scale below 1) cut their views from the resize_size square, which must then be
        larger than the crop; two multi_scale scales must not cut the same square.
        ``export archive`` refuses such a configuration; a worker loading an older archive logs it."""
        crop, resize, tta = self.input_size, self.resize_size or self.input_size, self.handler_tta
        problem = view_problem(tta, crop=crop, size=resize, scales=self.tta_scales) if crop else None
        if problem:
            return problem + ("; give distinct scales up to resize_size / input_size" if problem.startswith("tta_scales")
                              else "; use flip, or export with a larger resize size")
        if self.adaptive_tta and tta == "none":
            return (f"adaptive_tta needs the handler's TTA, and it has none (tta {self.tta}, graph_output "
                    f"{self.graph_output}): adaptive TTA would do nothing; set tta, or adaptive_tta: false")
        return None

    @property
    def handler_tta(self) -> str:
        """The TTA the handler applies: none when the graph returns probabilities or its own top-k."""
        return self.tta if self.graph_output == "logits" else "none"


def _numbers(text: str) -> tuple[float, ...]:
    """An argparse ``type=``: comma-separated numbers (argparse names the option and this message)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--option`` per command-line field of ``cls``, with its default, type, choices and help."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata["cli"]:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        if type(None) in typing.get_args(hint):  # int | None: an int on the command line, unset by default
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kwargs = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs.update(type=_numbers, metavar="S1,S2,...", default=",".join(map(str, f.default)))
        else:
            kwargs.update(type=hint, choices=f.metadata["choices"])
        parser.add_argument(flag, **kwargs)


def from_args(args: argparse.Namespace, cls, **facts):
    """``cls`` from the parsed options of :func:`add_arguments` plus the non-CLI ``facts``."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata["cli"] and hasattr(args, f.name)}
    return cls(**values, **facts)
