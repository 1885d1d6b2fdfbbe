"""Wrapping a gRPC method handler's behaviour, for server interceptors.

A ``grpc.RpcMethodHandler`` carries its behaviour in exactly one of four fields, by call type;
an interceptor that wraps it must find that field and replace it, keeping the rest. Both the
status interceptor (``common/runtime.py``) and the auth interceptor (``common/security.py``) do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

# The handler's behaviour field by call type, with the name metrics give that type.
CALL_TYPES = {"unary_unary": "unary", "unary_stream": "server_stream",
              "stream_unary": "client_stream", "stream_stream": "bidi_stream"}

Behaviour = Callable[..., Any]


def wrap_behaviour(handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, str], Behaviour],
                   **fields: Any) -> grpc.RpcMethodHandler:
    """The handler with its behaviour replaced by ``wrap(behaviour, kind)`` (``kind`` one of
    ``CALL_TYPES``) and any other ``fields`` replaced, e.g. ``request_deserializer``."""
    for kind in CALL_TYPES:
        inner = getattr(handler, kind)
        if inner is not None:
            return handler._replace(**{kind: wrap(inner, kind), **fields})  # type: ignore[attr-defined]
    return handler
