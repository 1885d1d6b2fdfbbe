"""Unit tests start nothing: no process, no server on a fixed port.

Each test's setup, call and teardown (module and session fixtures included, which set up in the
first test's setup) run with process creation refused, and a server (``socket.listen``, a gRPC
server's port) allowed only on port 0: an ephemeral port, as an in-process gRPC server uses.
These hooks apply only to items under tests/unit; what starts processes goes to tests/stack/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import weakref
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from grpc import _server as grpc_server


class StartedSomething(AssertionError):
    """A unit test started a process or bound a fixed port."""


def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise StartedSomething(f"a unit test must not start a process ({what}); move it to tests/stack/")
    return refuse


_PROCESS_STARTERS: list[tuple[object, str]] = [
    (subprocess.Popen, "_execute_child"),  # subprocess.run/call/check_output, multiprocessing spawn
    (os, "fork"), (os, "forkpty"), (os, "posix_spawn"), (os, "posix_spawnp"), (os, "system"),
    (os, "execv"), (os, "execve"),
]


def _ephemeral_only(add_port: Callable[..., int]) -> Callable[..., int]:
    def add(self: Any, address: str, *args: Any) -> int:
        if not address.endswith(":0"):
            raise StartedSomething(f"a unit test must not serve gRPC on a fixed port ({address}); "
                                   "use port 0 or move it to tests/stack/")
        return add_port(self, address, *args)
    return add


@contextmanager
def nothing_started() -> Iterator[None]:
    """Refuse process creation, and listening on a fixed port, while the block runs. A bind to
    a fixed port alone is allowed: devstack probes whether a port is free that way."""
    original_bind, original_listen = socket.socket.bind, socket.socket.listen
    fixed: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def bind(self: socket.socket, address: Any) -> None:
        original_bind(self, address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[1] != 0:
            fixed.add(self)

    def listen(self: socket.socket, *backlog: int) -> None:
        if self in fixed:
            raise StartedSomething(f"a unit test must not listen on a fixed port ({self.getsockname()!r}); "
                                   "bind port 0 or move it to tests/stack/")
        original_listen(self, *backlog)

    saved = [(owner, name, getattr(owner, name)) for owner, name in _PROCESS_STARTERS if hasattr(owner, name)]
    replaced: list[tuple[object, str, Any]] = [(owner, name, _refuse(name)) for owner, name, _ in saved]
    replaced += [(socket.socket, "bind", bind), (socket.socket, "listen", listen)]
    saved += [(socket.socket, "bind", original_bind), (socket.socket, "listen", original_listen)]
    for method in ("add_insecure_port", "add_secure_port"):  # gRPC binds in C, unseen above
        original = getattr(grpc_server._Server, method)
        saved.append((grpc_server._Server, method, original))
        replaced.append((grpc_server._Server, method, _ephemeral_only(original)))
    try:
        for owner, name, value in replaced:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with nothing_started():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with nothing_started():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    with nothing_started():
        return (yield)
