"""``python -m benchmarks.decode``: what one image costs the CPU before the forward, per decoding path.

For the payload sets of ``tools.photos`` (500x375 and 12 MP phone photos), one thread, medians of
``torch.utils.benchmark.Timer`` blocks (``tools.timing``): the header probe, the full-size decode
(torchvision's libjpeg-turbo), THE decoder with the evaluation transform's ``min_side`` (Pillow's
DCT-domain draft, ``inference.images.jpeg_scale``), simplejpeg at the same scale where it is
installed (the alternative that was measured against it; not a dependency), and the resize/crop to
the canvas from full size and from the reduced decode; and for training (``--preset photo``: decode, then
``RandomResizedCrop`` and the rest of the training preset) from a full-size decode and from one reduced to
the preset's ``min_decode_side``. Prints one line per path, the machine's ISA class first. The figures are in
docs/performance.md.
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.report import isa_class
from inference.images import decode_rgb, jpeg_scale, probe
from inference.transforms import EvalPreset
from tools.photos import photo_jpegs
from tools.timing import seconds_per_call
from training.config import TrainConfig
from training.engine import train_preset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=6, help="photos per payload set")
    p.add_argument("--crop-size", type=int, default=224, help="the evaluation transform's crop")
    p.add_argument("--resize-size", type=int, default=256, help="the evaluation transform's resize (min_side)")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    preset = EvalPreset(crop_size=args.crop_size, resize_size=args.resize_size)
    side = preset.min_decode_side
    train = train_preset(TrainConfig.create(data="-", out="-", preset="photo", input_size=args.crop_size,
                                            resize_size=args.resize_size))
    print(f"isa={isa_class()} threads=1 preset={preset} train min_side={train.min_decode_side}")
    for set_name in ("jpeg500", "phone12mp"):
        datas = [d for _, d in photo_jpegs(set_name, limit=args.photos)]
        info = probe(datas[0])
        scale = jpeg_scale(info.width, info.height, side)
        mb = sum(map(len, datas)) / len(datas) / 1e6
        full = [decode_rgb(d) for d in datas]
        reduced = [decode_rgb(d, min_side=side) for d in datas]
        paths = {"probe (header only)": lambda d, i: probe(d),
                 "decode full size": lambda d, i: decode_rgb(d),
                 f"decode min_side={side} (1/{scale})": lambda d, i: decode_rgb(d, min_side=side),
                 "resize+crop from full size": lambda d, i: preset(full[i]),
                 f"resize+crop from 1/{scale}": lambda d, i: preset(reduced[i]),
                 "train: full-size decode + photo preset": lambda d, i: train(decode_rgb(d)),
                 f"train: decode to 1/{jpeg_scale(info.width, info.height, train.min_decode_side)} + photo preset":
                     lambda d, i: train(decode_rgb(d, min_side=train.min_decode_side))}
        try:
            import simplejpeg
            h, w = reduced[0].shape[-2:]
            paths[f"simplejpeg 1/{scale} (not used)"] = lambda d, i: simplejpeg.decode_jpeg(
                d, colorspace="RGB", min_height=min(h, w), min_width=min(h, w))
        except ImportError:
            pass
        for name, fn in paths.items():
            def run(fn=fn):
                for i, d in enumerate(datas):
                    fn(d, i)
            ms = seconds_per_call(run, min_run_time=args.min_run_time) / len(datas) * 1000
            print(f"{set_name:<10} {info.width}x{info.height} {mb:4.2f} MB  {name:<44} {ms:7.2f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
