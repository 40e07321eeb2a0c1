"""The test process may fork (DataLoader workers) after it made gRPC calls: conftest switches gRPC core's
fork support off, without which such forks hang or crash now and then (grpc/grpc#32992)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# One process is a gRPC server; the other makes gRPC calls and then forks a DataLoader worker, 40 times over.
# With GRPC_ENABLE_FORK_SUPPORT unset, this loop hung in 5 of 5 runs of 100 rounds (AMX Xeon, grpcio 1.85).
_LOOP = r'''
import socket, subprocess, sys, time
import grpc, torch
from torch.utils.data import DataLoader, TensorDataset
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
server = subprocess.Popen([sys.executable, "-c", f"""
import grpc, time
from concurrent import futures
echo = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
s = grpc.server(futures.ThreadPoolExecutor(2))
s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {{"Echo": echo}}),))
s.add_insecure_port("127.0.0.1:{port}"); s.start(); time.sleep(120)
"""])
try:
    for i in range(40):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            for _ in range(3):
                channel.unary_unary("/t.S/Echo")(b"x", timeout=5)
        loader = DataLoader(TensorDataset(torch.arange(16.0)), batch_size=4, num_workers=1)
        assert sum(float(b[0].sum()) for b in loader) == 120.0
    print("rounds done")
finally:
    server.kill()
'''


def test_fork_support_is_off_before_grpc_is_imported():
    from tests import conftest
    assert not conftest.GRPC_IMPORTED_FIRST, "grpc was imported before tests/conftest.py could switch fork support off"
    assert os.environ.get("GRPC_ENABLE_FORK_SUPPORT") == "0"


@pytest.mark.slow
def test_forking_dataloader_workers_after_grpc_calls_does_not_hang():
    try:
        done = subprocess.run([sys.executable, "-c", _LOOP], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("gRPC calls followed by DataLoader forks hung (is GRPC_ENABLE_FORK_SUPPORT=0 still set?)")
    assert done.returncode == 0 and "rounds done" in done.stdout, done.stderr[-2000:]
