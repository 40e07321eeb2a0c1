"""What OpenVINO's thread pinning does to a split: the in-process limit pinned against unpinned.

    python -m benchmarks.pinning --graph benchmarks/.work/full/resnet50/export_resnet50/model_ov_int8.xml

OpenVINO pins each process's inference threads to the first cores of its affinity mask
(``ENABLE_CPU_PINNING``, its default on Linux). TorchServe runs every worker as its own process, so W
workers of T threads pinned all sit on the same T cores. For each workers x threads split of ``--grid``
this runs ``benchmarks.limit.in_process_limit`` (W spawned processes of T threads doing what a worker
does with a batch: header probe, decode + canvas, forward, top-k) once pinned and once not, in
``--rounds`` interleaved rounds (pinned, unpinned, pinned, ...), and prints the medians (img/s, summed
over the processes) with their range and the unpinned/pinned ratio. The handler's setting is
``openvino_cpu_pinning`` (default off, from this measurement).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.configs import BATCH, parse_grid, search_grid
from tools.photos import jpeg_files


def compare(graph: str, *, payloads, crop_size: int, resize_size: int, grid, precision: str = "f32",
            seconds: float = 6.0, rounds: int = 2, batch: int = BATCH) -> list[dict]:
    """Per split: ``pinned`` and ``unpinned`` img/s of each round, their medians and ``ratio`` (unpinned/pinned)."""
    from benchmarks.limit import LimitJob, in_process_limit
    rows = []
    for split in grid:
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(max(1, rounds)):
            for pinning in (True, False):
                job = LimitJob(payloads=tuple(payloads), crop_size=crop_size, resize_size=resize_size, graph=graph,
                               precision=precision, pinning=pinning, seconds=seconds, batch=batch)
                runs[pinning].append(in_process_limit(job, split)["img_s"])
        pinned, unpinned = statistics.median(runs[True]), statistics.median(runs[False])
        rows.append({"split": str(split), "pinned": runs[True], "unpinned": runs[False], "pinned_median": pinned,
                     "unpinned_median": unpinned, "ratio": unpinned / pinned})
    return rows


def _span(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", required=True, help="an exported OpenVINO graph (.xml) with export.json beside it")
    p.add_argument("--images", default=None, help="folder of JPEGs (default: the jpeg500 payload set of tools.photos)")
    p.add_argument("--precision", default="auto", help="OpenVINO inference precision hint: auto, f32 or bf16 "
                   "(auto: bf16 where the CPU has it, as the handler resolves it)")
    p.add_argument("--grid", default=None, help="workers x threads splits, e.g. 1x1,2x1,1x2 (default: the bench's "
                   "search grid for this machine)")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds of each in-process measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians over them are reported)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    graph = Path(args.graph)
    manifest_path = graph.parent / "export.json"
    if graph.suffix.lower() != ".xml" or not graph.is_file() or not manifest_path.is_file():
        print(f"error: {graph} is not an OpenVINO .xml graph with an export.json beside it", file=sys.stderr)
        return 2
    try:
        grid = parse_grid(args.grid) if args.grid else search_grid()
        from inference.backends import OPENVINO_PRECISIONS, openvino_precision
        if args.precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(OPENVINO_PRECISIONS)}; got {args.precision!r}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    payloads = jpeg_files(args.images, prefix="pinning-")
    if not payloads:
        print(f"error: no .jpg under {args.images}", file=sys.stderr)
        return 2
    precision = openvino_precision(args.precision)
    rows = compare(str(graph), payloads=payloads, crop_size=manifest["input_size"],
                   resize_size=manifest["resize_size"], grid=grid, precision=precision, seconds=args.seconds,
                   rounds=args.rounds)
    print(f"{graph.name}, precision {precision}, in-process img/s, median [min-max] of {max(1, args.rounds)} rounds")
    print(f"{'split':<6} {'pinned':>22} {'unpinned':>22} {'unpinned/pinned':>16}")
    for r in rows:
        print(f"{r['split']:<6} {_span(r['pinned']):>22} {_span(r['unpinned']):>22} {r['ratio']:>16.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"graph": str(graph), "precision": precision, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
