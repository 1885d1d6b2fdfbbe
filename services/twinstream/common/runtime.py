"""The process around a service: /metrics, a gRPC server with health and reflection, a health
server of its own for the probes, and a drained shutdown on SIGTERM/SIGINT.

Lifecycle: the constructor only records what to serve (no sockets, no logging set-up: ``__main__``
configures logging); ``start()`` binds and serves; ``stop()`` turns health NOT_SERVING, waits
``shutdown_drain_s`` so load balancers and readiness probes stop sending, then stops the server
with ``shutdown_grace_s`` for the calls in flight. The chart's terminationGracePeriodSeconds is
derived from the same two values (helm/twinstream/templates/_helpers.tpl).

Health is served twice from one HealthServicer: on the API port (clients, the dev stack) and on
``health_port`` with its own small thread pool, where the probes ask: open streams (each holds
one of the API server's workers) can then never starve a liveness probe into a restart.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from twinstream.common.config import Settings
from twinstream.common.handlers import CALL_TYPES, wrap_behaviour
from twinstream.common.metrics import Metrics, serve_metrics
from twinstream.common.security import add_server_port, server_interceptors
from twinstream.common.status import InvalidArgument, status_for

log = logging.getLogger(__name__)

# Registers a servicer on a server, e.g. ``lambda s: add_MatchingServicer_to_server(impl, s)``.
Registration = Callable[[grpc.Server], None]
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
HEALTH_WORKERS = 4
# Health and reflection (any version) are neither mapped nor counted.
_UNCOUNTED = ("grpc.health.", "grpc.reflection.")


class StatusInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes (``common/status.py``), then counts and times every call
    by method and final code; an exception nothing maps is logged and counted as UNKNOWN (grpc
    answers UNKNOWN for it too). Health and reflection calls are neither mapped nor counted."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service.startswith(_UNCOUNTED):
            return handler
        deserialize = handler.request_deserializer
        return wrap_behaviour(
            handler,
            lambda inner, kind: self._wrap(inner, (CALL_TYPES[kind], service, method),
                                           streaming_in=kind.startswith("stream"),
                                           streaming_out=kind.endswith("stream")),
            request_deserializer=deserialize and _tolerant(deserialize))

    def _wrap(self, inner: Callable[..., Any], labels: tuple[str, str, str], streaming_in: bool,
              streaming_out: bool) -> Callable[..., Any]:
        handled, handling = self.metrics.grpc_handled, self.metrics.grpc_handling

        def decoded(request: Any) -> Any:
            return map(_decoded, request) if streaming_in else _decoded(request)

        def record(started: float, code: grpc.StatusCode) -> None:
            handled.labels(*labels, code.name).inc()
            handling.labels(*labels).observe(time.perf_counter() - started)

        def fail(context: grpc.ServicerContext, exc: Exception, started: float) -> None:
            """Count the call's final code, then abort with the mapped status unless the handler
            chose one; returns (the caller re-raises: UNKNOWN) when nothing maps the error.
            Counted before aborting: an abort can end the call for the client at once."""
            chosen = _code_of(context)
            status = None if chosen is not None else status_for(exc)
            if chosen is None and status is None:
                log.error("unhandled error", exc_info=exc, extra={"method": labels[2]})
            record(started, chosen or (status[0] if status else grpc.StatusCode.UNKNOWN))
            if status is not None:
                context.abort(*status)

        if streaming_out:
            def streaming(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
                started = time.perf_counter()
                try:
                    yield from inner(decoded(request), context)
                except Exception as exc:
                    fail(context, exc, started)
                    raise
                except GeneratorExit:  # the client went away mid-stream
                    record(started, grpc.StatusCode.CANCELLED)
                    raise
                record(started, _code_of(context) or grpc.StatusCode.OK)
            return streaming

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = inner(decoded(request), context)
            except Exception as exc:
                fail(context, exc, started)
                raise
            record(started, _code_of(context) or grpc.StatusCode.OK)
            return response
        return unary


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code the handler set or aborted with; None if none (or the context cannot tell:
    grpc_testing's context leaves ``code()`` unimplemented)."""
    try:
        code = getattr(context, "code", lambda: None)()  # not in grpc-stubs' ServicerContext
    except NotImplementedError:
        return None
    return code if isinstance(code, grpc.StatusCode) else None


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


def build_server(settings: Settings, interceptors: Sequence[grpc.ServerInterceptor]) -> grpc.Server:
    """The API server: the one place it is built (credentials and interceptors go here)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.server.grpc_max_workers,
                                   thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=settings.server.grpc_max_concurrent_rpcs or None,
    )


class ServiceRuntime:
    """Runs one service: /metrics, gRPC with health + reflection, health for the probes.

    Build it with what to serve, then ``run_until_stopped`` (a service's ``__main__``) or
    ``start()`` and ``stop()`` (tests). Nothing is bound before ``start()``.
    """

    def __init__(self, settings: Settings, metrics: Metrics, service_names: Iterable[str] = (),
                 registrations: Iterable[Registration] = (),
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.registrations = list(registrations)
        self.service_names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.stopping = threading.Event()
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.health_server: grpc.Server | None = None
        self.grpc_port = self.health_port = self.metrics_port = 0
        self._metrics_http: Any = None
        self._ready = False
        self._unhealthy: set[str] = set()
        self._health_lock = threading.Lock()
        self._publish_health()

    def start(self) -> None:
        """Bind the ports and serve; health stays NOT_SERVING until ``set_serving(True)``."""
        if self.server is not None:
            raise RuntimeError("the runtime is started already")
        settings = self.settings
        # Auth runs inside the status mapping, so its refusals are answered and counted.
        server = build_server(settings, [StatusInterceptor(self.metrics),
                                         *server_interceptors(settings, self.registry)])
        for register in self.registrations:
            register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(self.service_names, server)
        self.grpc_port = add_server_port(
            server, f"{settings.server.grpc_host}:{settings.server.grpc_port}", settings)
        probes = grpc.server(futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS,
                                                        thread_name_prefix="health"),
                             options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, probes)
        # Plain text: kubelet gRPC probes cannot speak TLS, and health carries no data.
        self.health_port = probes.add_insecure_port(f"{settings.server.grpc_host}:{settings.server.health_port}")
        self._metrics_http, self.metrics_port = serve_metrics(
            settings.server.metrics_port, settings.server.grpc_host, self.registry)
        probes.start()
        server.start()
        self.server, self.health_server = server, probes
        log.info("started", extra={"grpc_port": self.grpc_port, "health_port": self.health_port,
                                   "metrics_port": self.metrics_port})

    def stop(self) -> None:
        """NOT_SERVING, wait ``shutdown_drain_s``, then stop with ``shutdown_grace_s`` for the
        calls in flight (new calls are refused from then on)."""
        self.set_serving(False)
        if self.server is None:
            return
        if self.settings.server.shutdown_drain_s > 0:
            log.info("draining", extra={"drain_s": self.settings.server.shutdown_drain_s})
            time.sleep(self.settings.server.shutdown_drain_s)
        self.server.stop(grace=self.settings.server.shutdown_grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(grace=None).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.server = self.health_server = self._metrics_http = None
        log.info("stopped")

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

    def _not_serving_once_stopping(self) -> None:
        self.stopping.wait()
        self.set_serving(False)

    def run_until_stopped(self, work: Callable[[threading.Event], None] | None = None) -> None:
        """Start, run ``work(stopping)`` (or just serve) until SIGTERM/SIGINT, then ``stop()``.

        Call from the main thread: it installs the signal handlers, which only set ``stopping``
        (health turns NOT_SERVING at once on a thread; the shutdown runs here, not in a handler).
        """
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        # NOT_SERVING as soon as the signal arrives, while the work loop still finishes its batch.
        threading.Thread(target=self._not_serving_once_stopping, name="not-serving-on-stop",
                         daemon=True).start()
        self.start()
        try:
            if work is None:
                self.set_serving(True)
                self.stopping.wait()
            else:
                work(self.stopping)
        finally:
            self.stop()
