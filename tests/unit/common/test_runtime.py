"""The servers' interceptor: one mapping from exceptions to gRPC status codes, and the metric
counts the final code (an uncaught error as UNKNOWN, never OK), on a fresh registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
from prometheus_client import CollectorRegistry
from pymilvus.client.types import Status
from pymilvus.exceptions import MilvusException

from twinstream.common.errors import PermanentError, TransientError
from twinstream.common.metrics import Metrics
from twinstream.common.runtime import StatusInterceptor
from twinstream.common.status import InvalidArgument, NotFound, ResourceExhausted
from twinstream.v1 import items_pb2


def _triton_down() -> Exception:
    from tritonclient.utils import InferenceServerException

    return InferenceServerException("failed to connect to all addresses",
                                    status="StatusCode.UNAVAILABLE")


RAISES: dict[str, Callable[[], BaseException]] = {
    "Invalid": lambda: InvalidArgument("k must be positive", "bad_k"),
    "Missing": lambda: NotFound("no such item"),
    "Exhausted": lambda: ResourceExhausted("too many filters"),
    "Timeout": lambda: TimeoutError("deadline"),
    "MilvusDown": lambda: MilvusException(code=Status.CONNECT_FAILED, message="Fail connecting"),
    "TritonDown": _triton_down,
    "Transient": lambda: TransientError("broker unavailable"),  # no retry-after: still UNAVAILABLE
    "Permanent": lambda: PermanentError("id_conflict", "other content under this id"),
    "Bug": lambda: KeyError("a bug"),
}
EXPECTED = {
    "Invalid": grpc.StatusCode.INVALID_ARGUMENT, "Missing": grpc.StatusCode.NOT_FOUND,
    "Exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED, "Timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "MilvusDown": grpc.StatusCode.UNAVAILABLE, "TritonDown": grpc.StatusCode.UNAVAILABLE,
    "Transient": grpc.StatusCode.UNAVAILABLE, "Permanent": grpc.StatusCode.INVALID_ARGUMENT,
    "Bug": grpc.StatusCode.UNKNOWN,
}


def _raiser(name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RAISES[name]()
    return handler


def _stream_raiser(name: str) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
    def handler(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        raise RAISES[name]()
    return handler


def _aborts(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "chosen by the handler")
    return b""


METRICS = Metrics.create(CollectorRegistry())


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[StatusInterceptor(METRICS)])
    methods: dict[str, grpc.RpcMethodHandler] = {
        "Aborts": grpc.unary_unary_rpc_method_handler(_aborts),
        "Fine": grpc.unary_unary_rpc_method_handler(lambda r, c: r),
        "Parses": grpc.unary_unary_rpc_method_handler(
            lambda r, c: r.SerializeToString(), request_deserializer=items_pb2.Item.FromString),
        "ParsesStream": grpc.stream_unary_rpc_method_handler(
            lambda rs, c: b"".join(r.SerializeToString() for r in rs),
            request_deserializer=items_pb2.Item.FromString),
    }
    for name in RAISES:
        methods[name] = grpc.unary_unary_rpc_method_handler(_raiser(name))
        methods[f"Stream{name}"] = grpc.unary_stream_rpc_method_handler(_stream_raiser(name))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.T", methods)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    server.stop(None)


def _unary(channel: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)


def _streaming(channel: grpc.Channel, path: str) -> grpc.UnaryStreamMultiCallable:
    return channel.unary_stream(path, request_serializer=None, response_deserializer=None)


def _count(method: str, code: str, grpc_type: str = "unary") -> float:
    return METRICS.registry.get_sample_value("twinstream_grpc_server_handled_total", {
        "grpc_type": grpc_type, "grpc_service": "test.T", "grpc_method": method,
        "grpc_code": code}) or 0.0


@pytest.mark.parametrize("name", sorted(RAISES))
def test_exceptions_map_to_their_status_and_the_metric_counts_it(channel: grpc.Channel,
                                                                 name: str) -> None:
    before = _count(name, EXPECTED[name].name)
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, f"/test.T/{name}")(b"x", timeout=10)
    assert caught.value.code() == EXPECTED[name]
    assert _count(name, EXPECTED[name].name) == before + 1
    assert _count(name, "OK") == 0


def test_a_reason_leads_the_details(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, "/test.T/Invalid")(b"x", timeout=10)
    assert caught.value.details() == "bad_k: k must be positive"


@pytest.mark.parametrize("name", ["Invalid", "MilvusDown", "Bug"])
def test_streaming_answers_map_the_same_way(channel: grpc.Channel, name: str) -> None:
    responses = _streaming(channel, f"/test.T/Stream{name}")(b"x", timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        list(responses)
    assert caught.value.code() == EXPECTED[name]
    assert _count(f"Stream{name}", EXPECTED[name].name, "server_stream") >= 1


def test_a_status_the_handler_chose_is_kept(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, "/test.T/Aborts")(b"x", timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _count("Aborts", "FAILED_PRECONDITION") == 1


def test_success_is_counted_as_ok(channel: grpc.Channel) -> None:
    assert _unary(channel, "/test.T/Fine")(b"x", timeout=10) == b"x"
    assert _count("Fine", "OK") == 1


GOOD = items_pb2.Item(item_id="ab", tenant="t").SerializeToString()
# Bytes a non-Python client can send: a string field holding invalid UTF-8, or no protobuf at all.
UNPARSABLE = [GOOD.replace(b"ab", b"\xff\xfe"), b"\xff\xff\xff"]


@pytest.mark.parametrize("payload", UNPARSABLE)
def test_a_request_that_does_not_parse_is_invalid_argument_not_internal(
        channel: grpc.Channel, payload: bytes) -> None:
    assert _unary(channel, "/test.T/Parses")(GOOD, timeout=10) == GOOD
    with pytest.raises(grpc.RpcError) as caught:
        _unary(channel, "/test.T/Parses")(payload, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith("malformed_request: ")
    streaming = channel.stream_unary("/test.T/ParsesStream", request_serializer=None,
                                     response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        streaming(iter([GOOD, payload]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
