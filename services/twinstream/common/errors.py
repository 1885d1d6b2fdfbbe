"""The error model: every library error is classified where its client is called.

``TransientError``: a dependency (broker, Milvus, Triton) is unavailable; the same work will
succeed later, so the stream loop pauses, seeks back and retries with backoff.
``PermanentError``: this input can never succeed; the loop dead-letters it with ``reason``.
Anything else is unknown: the loop isolates the record that raises it (see common/kafka.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

# gRPC codes that mean "the server is not there (yet)", not "your request is wrong".
_TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class TransientError(Exception):
    """A dependency is unavailable; retry the same work after ``retry_after_s`` (or backoff)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(Exception):
    """This input can never succeed: ``reason`` is a stable snake_case code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def milvus_transient(exc: BaseException) -> bool:
    """Whether a pymilvus/gRPC error means Milvus is unreachable, overloaded or restarting."""
    from pymilvus.client.types import Status
    from pymilvus.exceptions import (
        ConnectError,
        ConnectionNotExistException,
        ErrorCode,
        MilvusException,
        MilvusUnavailableException,
    )

    if isinstance(exc, ConnectError | ConnectionNotExistException | MilvusUnavailableException
                  | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, grpc.RpcError):
        return exc.code() in _TRANSIENT_CODES
    if isinstance(exc, MilvusException):
        # pymilvus gives up retrying with the gRPC status as the code; a rate limit is an int;
        # its reconnect after a server restart fails with Status.CONNECT_FAILED while the server
        # is still down (the fault matrix dead-lettered a batch as handler_error on it)
        return (exc.code in _TRANSIENT_CODES or exc.code == ErrorCode.RATE_LIMIT
                or exc.code == Status.CONNECT_FAILED or bool(getattr(exc, "retriable", False)))
    return False


def triton_transient(exc: BaseException) -> bool:
    """Whether a tritonclient error means the server (or its model's backend) is down."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if not isinstance(exc, InferenceServerException):
        return False
    status = str(exc.status() or "")
    # a crashed python-backend stub answers INTERNAL until Triton restarts it
    return (status.rsplit(".", 1)[-1] in _TRITON_TRANSIENT
            or "Stub process" in str(exc.message()))


_TRITON_TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def guarded(target: T, is_transient: Callable[[BaseException], bool], what: str) -> T:
    """``target`` with every method call raising TransientError where ``is_transient`` says so.

    Wraps a whole client object once (e.g. the MilvusClient), so no call site can forget it.
    """
    return _Guarded(target, is_transient, what)  # type: ignore[return-value]


class _Guarded:
    def __init__(self, target: Any, is_transient: Callable[[BaseException], bool], what: str) -> None:
        self._target = target
        self._is_transient = is_transient
        self._what = what

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except TransientError:
                raise
            except Exception as exc:
                if self._is_transient(exc):
                    raise TransientError(f"{self._what} unavailable ({name}): {exc}") from exc
                raise
        return call
