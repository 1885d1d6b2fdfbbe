"""The process around a service: logging, /metrics, a gRPC server with health and reflection,
and a clean shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twinstream.common.config import Settings
from twinstream.common.logs import configure_logging
from twinstream.common.metrics import GRPC_REQUESTS, GRPC_SECONDS, serve_metrics
from twinstream.common.security import add_server_port, health_server, server_interceptors
from twinstream.common.status import InvalidArgument, status_for

log = logging.getLogger(__name__)

# Registers a servicer on a server, e.g. ``lambda s: add_MatchingServicer_to_server(impl, s)``.
Registration = Callable[[grpc.Server], None]


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes (``common/status.py``), then counts and times every call
    by method and final code; an exception nothing maps is logged and counted as UNKNOWN."""

    def __init__(self, service: str) -> None:
        self.service = service

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None or method in ("Check", "Watch", "ServerReflectionInfo"):
            return handler
        deserialize = handler.request_deserializer
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, kind)
            if inner is not None:
                wrapped = self._wrap(inner, method, streaming_in=kind.startswith("stream"),
                                     streaming_out=kind.endswith("stream"))
                return handler._replace(**{  # type: ignore[attr-defined]
                    kind: wrapped, "request_deserializer": deserialize and _tolerant(deserialize)})
        return handler

    def _wrap(self, inner: Callable[..., Any], method: str, streaming_in: bool,
              streaming_out: bool) -> Callable[..., Any]:
        service = self.service

        def decoded(request: Any) -> Any:
            return map(_decoded, request) if streaming_in else _decoded(request)

        def record(context: grpc.ServicerContext, started: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN" if failed else "OK"
            GRPC_REQUESTS.labels(service, method, name).inc()
            GRPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)

        def fail(context: grpc.ServicerContext, exc: Exception) -> None:
            """Abort with the mapped status; return (the caller re-raises) when the handler
            aborted already or nothing maps the error (a bug: grpc answers UNKNOWN)."""
            if isinstance(getattr(context, "code", lambda: None)(), grpc.StatusCode):
                return  # the handler called context.abort itself
            status = status_for(exc)
            if status is None:
                log.error("unhandled error", exc_info=exc, extra={"method": method})
                return
            context.abort(*status)

        if streaming_out:
            def streaming(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
                started, failed = time.perf_counter(), False
                try:
                    yield from inner(decoded(request), context)
                except Exception as exc:
                    failed = True
                    fail(context, exc)
                    raise
                finally:
                    record(context, started, failed)
            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            started, failed = time.perf_counter(), False
            try:
                return inner(decoded(request), context)
            except Exception as exc:
                failed = True
                fail(context, exc)
                raise
            finally:
                record(context, started, failed)
        return unary


@dataclass(frozen=True)
class _Undecodable:
    """A request message that did not parse (malformed bytes, invalid UTF-8 in a string)."""

    error: str


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """Let an unparsable request reach the handler wrapper, which answers INVALID_ARGUMENT;
    grpc itself would answer INTERNAL ("Exception deserializing request!")."""
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError and its relatives
            return _Undecodable(f"{type(exc).__name__}: {exc}")
    return parse


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message: {request.error}", "malformed_request")
    return request


class ServiceRuntime:
    """Runs one service: configure logging, expose /metrics, serve gRPC with health + reflection."""

    def __init__(self, settings: Settings, service_names: Iterable[str] = (),
                 registrations: Iterable[Registration] = (), max_workers: int = 16) -> None:
        configure_logging(settings.service, settings.log_level)
        self.settings = settings
        self.stopping = threading.Event()
        self.health = health.HealthServicer()
        self._ready = False
        self._unhealthy: set[str] = set()
        self._health_lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            # Auth runs inside the status mapping, so its refusals are answered and counted.
            interceptors=[_MetricsInterceptor(settings.service), *server_interceptors(settings)],
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)],
        )
        for register in registrations:
            register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(self.service_names, self.server)
        self.grpc_port = add_server_port(self.server, f"{settings.grpc_host}:{settings.grpc_port}",
                                         settings)
        self.metrics_port = serve_metrics(settings.metrics_port, settings.grpc_host)
        self.probe = health_server(self.health, settings)  # plain-text health for kubelet probes

    def start(self) -> None:
        """Start serving and install signal handlers (call from the main thread)."""
        self.server.start()
        if self.probe is not None:
            self.probe[0].start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("started", extra={"grpc_port": self.grpc_port, "metrics_port": self.metrics_port})

    def set_serving(self, serving: bool) -> None:
        """Whether the service is up at all; SERVING also needs every component healthy."""
        with self._health_lock:
            self._ready = serving
            self._publish_health()

    def health_hook(self, component: str) -> Callable[[bool], None]:
        """A callback for a part of the service (a stream loop, the producer) to report on.

        Health is NOT_SERVING while any component reports unhealthy, so a stalled loop or a
        broker outage shows, and SERVING again once it recovers.
        """
        def report(healthy: bool) -> None:
            with self._health_lock:
                if healthy == (component not in self._unhealthy):
                    return
                if healthy:
                    self._unhealthy.discard(component)
                else:
                    self._unhealthy.add(component)
                log.log(logging.INFO if healthy else logging.WARNING, "component health",
                        extra={"component": component, "healthy": healthy})
                self._publish_health()
        return report

    def _publish_health(self) -> None:
        serving = self._ready and not self._unhealthy
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def run_until_stopped(self, work: Callable[[threading.Event], None] | None = None) -> None:
        """Run ``work(stopping)`` (or just wait) until a signal arrives, then shut down."""
        self.start()
        try:
            if work is None:
                self.set_serving(True)
                self.stopping.wait()
            else:
                work(self.stopping)
        finally:
            self.set_serving(False)
            self.server.stop(grace=5).wait()
            if self.probe is not None:
                self.probe[0].stop(grace=1)
            log.info("stopped")
