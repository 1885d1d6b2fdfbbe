"""The guard of tests/unit/conftest.py: a unit test that starts a process or binds a fixed port
fails (its StartedSomething is an AssertionError)."""

from __future__ import annotations

import socket
import subprocess
from concurrent import futures

import grpc
import pytest


def test_a_unit_test_cannot_start_a_process() -> None:
    with pytest.raises(AssertionError, match="tests/stack"):
        subprocess.run(["true"], check=True)


def test_a_unit_test_cannot_listen_on_a_fixed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with socket.socket() as sock, pytest.raises(AssertionError, match="fixed port"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_a_unit_test_may_listen_on_an_ephemeral_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert sock.getsockname()[1] > 0


def test_a_unit_test_cannot_serve_grpc_on_a_fixed_port() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(AssertionError, match="fixed port"):
        server.add_insecure_port("127.0.0.1:40124")
