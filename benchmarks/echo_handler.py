"""A TorchServe handler that does no work: each request is answered with its body's length in bytes.

What :mod:`benchmarks.frontend_cost` serves to measure TorchServe's own per-request cost (frontend,
worker socket) without decoding or a model. A module-level ``handle`` is TorchServe's function-handler
contract; a body of 0 bytes is answered with ``0``.
"""
from __future__ import annotations


def handle(data, context):
    if data is None:  # TorchServe's initialization call
        return None
    return [len(row.get("body") or row.get("data") or b"") for row in data]
