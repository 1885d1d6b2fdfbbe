"""``ServiceRuntime``'s lifecycle, in-process on loopback: the constructor binds nothing,
``start()`` binds, health answers on its own pool while streams hold every API worker,
``maximum_concurrent_rpcs`` refuses the excess, and ``stop()`` turns NOT_SERVING, drains, then
lets calls in flight finish."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from twinstream.common.config import Settings
from twinstream.common.metrics import Metrics
from twinstream.common.runtime import ServiceRuntime

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MakeRuntime = Callable[..., ServiceRuntime]


class Blocking:
    """A test service whose calls wait until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def hold(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.entered.release()
        yield b"open"
        self.release.wait(30)

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.entered.release()
        self.release.wait(30)
        return b"done"

    def register(self, server: grpc.Server) -> None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Blocking", {
            "Hold": grpc.unary_stream_rpc_method_handler(self.hold),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Echo": grpc.unary_unary_rpc_method_handler(lambda r, c: r),
        })])


@pytest.fixture
def blocking() -> Iterator[Blocking]:
    service = Blocking()
    yield service
    service.release.set()


@pytest.fixture
def make_runtime(blocking: Blocking) -> Iterator[MakeRuntime]:
    made: list[ServiceRuntime] = []

    def make(**overrides: Any) -> ServiceRuntime:
        server = {"grpc_max_workers": 2, "grpc_max_concurrent_rpcs": 0, **overrides}
        settings = Settings(service="lifecycle", server=server, tls={"plaintext": True},
                            auth={"disabled": True})
        registry = CollectorRegistry()
        runtime = ServiceRuntime(settings, Metrics.create(registry), ["test.Blocking"],
                                 [blocking.register], registry=registry)
        made.append(runtime)
        return runtime
    yield make
    blocking.release.set()
    for runtime in made:
        runtime.stop()  # returns at once when the test stopped it


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def check(port: int, timeout: float = 10) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return int(reply.status)


def call(channel: grpc.Channel, method: str, timeout: float = 10) -> bytes:
    stub = channel.unary_unary(f"/test.Blocking/{method}", request_serializer=None,
                               response_deserializer=None)
    return bytes(stub(b"x", timeout=timeout))


def _open_sockets() -> int:
    """Sockets this process holds (Linux: /proc/self/fd links read ``socket:[inode]``)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:  # closed while listing
            continue
    return count


def test_the_constructor_binds_no_port(make_runtime: MakeRuntime) -> None:
    before = _open_sockets()
    runtime = make_runtime()
    assert _open_sockets() == before  # no listening socket (nor any other) was opened
    assert runtime.server is None and (runtime.grpc_port, runtime.health_port, runtime.metrics_port) == (0, 0, 0)
    runtime.start()
    assert min(runtime.grpc_port, runtime.health_port, runtime.metrics_port) > 0


def test_start_serves_the_api_health_and_metrics(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime()
    runtime.start()
    assert check(runtime.grpc_port) == check(runtime.health_port) == NOT_SERVING
    runtime.set_serving(True)
    assert check(runtime.grpc_port) == check(runtime.health_port) == SERVING
    with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        assert call(channel, "Echo") == b"x"
    with urllib.request.urlopen(f"http://127.0.0.1:{runtime.metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert ('twinstream_grpc_server_handled_total{grpc_code="OK",grpc_method="Echo",'
            'grpc_service="test.Blocking",grpc_type="unary"} 1.0') in text


def test_health_answers_while_open_streams_hold_every_api_worker(
        make_runtime: MakeRuntime, blocking: Blocking) -> None:
    runtime = make_runtime(grpc_max_workers=2)
    runtime.start()
    runtime.set_serving(True)
    with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        hold = channel.unary_stream("/test.Blocking/Hold", request_serializer=None,
                                    response_deserializer=None)
        streams = [hold(b"x", timeout=60) for _ in range(4)]  # twice the worker pool
        for stream in streams[:2]:
            assert next(iter(stream)) == b"open"
        with pytest.raises(grpc.RpcError) as starved:
            check(runtime.grpc_port, timeout=1)  # the API port's health waits for a worker
        assert starved.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert check(runtime.health_port) == SERVING
        blocking.release.set()
        for stream in streams:
            list(stream)


def test_calls_beyond_maximum_concurrent_rpcs_are_refused(
        make_runtime: MakeRuntime, blocking: Blocking) -> None:
    runtime = make_runtime(grpc_max_workers=4, grpc_max_concurrent_rpcs=2)
    runtime.start()
    with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        hold = channel.unary_stream("/test.Blocking/Hold", request_serializer=None,
                                    response_deserializer=None)
        streams = [hold(b"x", timeout=60) for _ in range(2)]
        for stream in streams:
            assert next(iter(stream)) == b"open"
        with pytest.raises(grpc.RpcError) as refused:
            call(channel, "Echo")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        blocking.release.set()
        for stream in streams:
            list(stream)
        assert call(channel, "Echo") == b"x"


def test_stop_turns_not_serving_and_the_api_still_answers_while_draining(
        make_runtime: MakeRuntime) -> None:
    runtime = make_runtime(shutdown_drain_s=5.0, shutdown_grace_s=1.0)
    runtime.start()
    runtime.set_serving(True)
    port = runtime.grpc_port
    stopper = threading.Thread(target=runtime.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while check(runtime.health_port) != NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert check(runtime.health_port) == NOT_SERVING
    assert stopper.is_alive(), "still draining"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert call(channel, "Echo") == b"x"
    stopper.join(20)
    assert not stopper.is_alive()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as gone:
        call(channel, "Echo", timeout=2)
    assert gone.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_a_call_in_flight_finishes_within_the_grace(make_runtime: MakeRuntime, blocking: Blocking) -> None:
    runtime = make_runtime(shutdown_drain_s=0.0, shutdown_grace_s=30.0)
    runtime.start()
    with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        answer = channel.unary_unary("/test.Blocking/Slow", request_serializer=None,
                                     response_deserializer=None).future(b"x", timeout=60)
        assert blocking.entered.acquire(timeout=10)
        stopper = threading.Thread(target=runtime.stop)
        stopper.start()
        blocking.release.set()
        assert answer.result(timeout=30) == b"done"
        stopper.join(30)
    assert not stopper.is_alive()


def test_sigterm_turns_not_serving_while_the_work_loop_finishes_then_stops() -> None:
    registry = CollectorRegistry()
    runtime = ServiceRuntime(Settings(service="lifecycle", tls={"plaintext": True}, auth={"disabled": True}),
                             Metrics.create(registry), registry=registry)
    seen: list[int] = []

    def work(stopping: threading.Event) -> None:
        runtime.set_serving(True)
        seen.append(check(runtime.health_port))
        # The handler run_until_stopped installed, called as the interpreter would on SIGTERM: a
        # real signal to the pytest process kills it when helm-python-sdk's Go runtime is loaded
        # (tests/test_helm.py runs first in the suite; the Go runtime owns signal delivery).
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "run_until_stopped installs a SIGTERM handler"
        handler(signal.SIGTERM, None)
        assert stopping.wait(10)
        deadline = time.monotonic() + 10  # the loop's last batch: probes already see NOT_SERVING
        while check(runtime.health_port) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(check(runtime.health_port))

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runtime.run_until_stopped(work)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert seen == [SERVING, NOT_SERVING]
    assert runtime.server is None and runtime.stopping.is_set()
