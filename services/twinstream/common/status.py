"""Which gRPC status an exception means: the one mapping the servers' interceptor applies
(``common/runtime.py``), so handlers raise and never pick status codes themselves.

Client errors carry their code on the class; outages of Milvus or Triton are recognised from
the client libraries' own exceptions (and from ``TransientError``, which the client boundaries
raise) and answered UNAVAILABLE, so a client knows to retry; a ``PermanentError`` is the
caller's input and answered INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

from twinstream.common.errors import PermanentError, TransientError, milvus_transient, triton_transient


class ServiceError(Exception):
    """An answer other than OK that the handler chose; ``reason`` is a stable snake_case code."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, detail: str, reason: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if reason else detail)
        self.reason = reason
        self.detail = detail


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    """No token, or one that is forged, expired or malformed (``common/security.py``)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """A valid token that does not grant this method's scope or the request's tenant."""

    code = grpc.StatusCode.PERMISSION_DENIED


_OUTAGE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, details) for ``exc``, or None when it is a bug (the server answers UNKNOWN)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "the deadline expired"
    if isinstance(exc, TransientError):
        return grpc.StatusCode.UNAVAILABLE, f"a backend is unavailable: {exc}"
    if isinstance(exc, PermanentError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call) and exc.code() in _OUTAGE_CODES:
        return grpc.StatusCode.UNAVAILABLE, f"a backend is unavailable: {exc.details()}"
    return _library_status(exc)


def _library_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """A Milvus or Triton client error: an outage by the same rule the stream loops retry on
    (``common/errors.py``), or a missing collection."""
    # Imported here: a service that has neither client never pays for the import.
    from pymilvus.exceptions import ErrorCode, MilvusException

    if triton_transient(exc) and not isinstance(exc, ConnectionError | TimeoutError):
        return grpc.StatusCode.UNAVAILABLE, f"the encoder (Triton) is unavailable: {exc}"
    if milvus_transient(exc):
        if isinstance(exc, MilvusException):
            return grpc.StatusCode.UNAVAILABLE, f"Milvus is unavailable: {exc.message}"
        return grpc.StatusCode.UNAVAILABLE, f"a backend is unavailable: {exc}"
    if isinstance(exc, MilvusException) and exc.code == ErrorCode.COLLECTION_NOT_FOUND:
        return grpc.StatusCode.NOT_FOUND, f"nothing indexed yet: {exc.message}"
    return None
