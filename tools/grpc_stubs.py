"""Python gRPC stubs compiled from TorchServe's own protos, the ones inside its wheel.

TorchServe 0.12 ships ``inference.proto`` (its own ``InferenceAPIsService``: ``Ping``,
``Predictions``), ``management.proto`` and ``open_inference_grpc.proto`` (the Open Inference
Protocol's ``GRPCInferenceService``, in the package ``org.pytorch.serve.grpc.openinference`` rather
than KServe's ``inference``) inside ``ts/frontend/model-server.jar`` under ``proto/``, together with
the ``google/rpc/status.proto`` they import. :func:`compile_stubs` extracts them and runs
``grpc_tools.protoc``; the generated modules are imported from the output folder.
"""
from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path

PROTOS = ("inference.proto", "management.proto", "open_inference_grpc.proto")


def frontend_jar() -> Path:
    import ts
    jar = Path(ts.__file__).resolve().parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise FileNotFoundError(f"{jar} not found: is torchserve installed (make setup)?")
    return jar


def compile_stubs(out: str | Path) -> Path:
    """Write ``*_pb2.py`` / ``*_pb2_grpc.py`` for TorchServe's protos into ``out``; return ``out``."""
    from grpc_tools import protoc

    out = Path(out)
    src = out / "proto"
    src.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(frontend_jar()) as jar:
        for name in [f"proto/{p}" for p in PROTOS] + ["google/rpc/status.proto"]:
            target = src / name.removeprefix("proto/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jar.read(name))
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    for proto in (*PROTOS, "google/rpc/status.proto"):
        code = protoc.main(["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                            str(src / proto)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")
    return out


def load(out: str | Path, name: str):
    """``(name_pb2, name_pb2_grpc)`` from a folder written by :func:`compile_stubs`, e.g. ``"inference"``."""
    out = str(Path(out).resolve())
    if out not in sys.path:
        sys.path.insert(0, out)
    return importlib.import_module(f"{name}_pb2"), importlib.import_module(f"{name}_pb2_grpc")
