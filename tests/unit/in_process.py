"""Servicers in-process with ``grpc_testing``, behind the servers' real interceptor.

``grpc_testing`` calls a servicer's methods by name and knows no interceptors; the servicer it
gets here is one whose methods are the handlers ``StatusInterceptor`` wraps, so exceptions map
to status codes (and are counted) exactly as on a real server.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import grpc_testing
from google.protobuf.descriptor import ServiceDescriptor

from twinstream.common.metrics import Metrics
from twinstream.common.runtime import StatusInterceptor


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _returning(handler: grpc.RpcMethodHandler) -> Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler]:
    return lambda _details: handler


def _kind(method: Any) -> str:
    return (f"{'stream' if method.client_streaming else 'unary'}_"
            f"{'stream' if method.server_streaming else 'unary'}")


def serve(servicer: object, service: ServiceDescriptor, metrics: Metrics) -> grpc_testing.Server:
    """A grpc_testing server for ``servicer`` whose calls pass through ``StatusInterceptor``."""
    interceptor = StatusInterceptor(metrics)
    wrapped: dict[str, Callable[..., Any]] = {}
    for method in service.methods:
        kind = _kind(method)
        handler = getattr(grpc, f"{kind}_rpc_method_handler")(getattr(servicer, method.name))
        intercepted = interceptor.intercept_service(
            _returning(handler), _CallDetails(f"/{service.full_name}/{method.name}"))
        wrapped[method.name] = getattr(intercepted, kind)
    return grpc_testing.server_from_dictionary({service: SimpleNamespace(**wrapped)},
                                               grpc_testing.strict_real_time())


def unary(server: grpc_testing.Server, service: ServiceDescriptor, method: str,
          request: Any) -> tuple[Any, grpc.StatusCode, str]:
    """Run one unary call; (response, code, details)."""
    rpc = server.invoke_unary_unary(service.methods_by_name[method], (), request, None)
    response, _trailing, code, details = rpc.termination()
    return response, code, details


def stream_in(server: grpc_testing.Server, service: ServiceDescriptor, method: str,
              requests: list[Any]) -> tuple[Any, grpc.StatusCode, str]:
    """Run one client-streaming call with ``requests``; (response, code, details)."""
    rpc = server.invoke_stream_unary(service.methods_by_name[method], (), None)
    for request in requests:
        rpc.send_request(request)
    rpc.requests_closed()
    response, _trailing, code, details = rpc.termination()
    return response, code, details
