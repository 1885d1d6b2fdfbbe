"""The ingestion servicer behind the real interceptor (an in-process gRPC server on loopback),
with the real SQLite id store and a recording producer in place of the broker."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.config import Settings
from twinstream.common.kafka import Producer
from twinstream.common.metrics import Metrics
from twinstream.common.runtime import StatusInterceptor
from twinstream.ingestion.service import Ingestion
from twinstream.ingestion.store import AcceptedIds
from twinstream.v1 import ingestion_pb2, ingestion_pb2_grpc, items_pb2
from unit.fake_kafka import FakeProducer

POISON = {
    "nested_5000_deep": b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "integer_of_5000_digits": b'{"a": ' + b"9" * 5000 + b"}",
    "lone_surrogate": b'{"a": "\\ud800"}',
    "nan": b'{"a": NaN}',
    "duplicate_key": b'{"a": 1, "a": 2}',
}


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def ingestion(tmp_path: Path, producer: FakeProducer) -> Iterator[Ingestion]:
    ids = AcceptedIds(tmp_path / "ids.sqlite")
    yield Ingestion(Settings(service="ingestion"), ids, Producer(lambda: producer))
    ids.close()


@pytest.fixture
def stub(ingestion: Ingestion) -> Iterator[ingestion_pb2_grpc.IngestionStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[StatusInterceptor(Metrics.unexported())])
    ingestion_pb2_grpc.add_IngestionServicer_to_server(ingestion, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield ingestion_pb2_grpc.IngestionStub(channel)
    server.stop(None)


def record_item(item_id: str, content: bytes) -> items_pb2.Item:
    return items_pb2.Item(item_id=item_id, tenant="acme", modality=items_pb2.RECORD, content=content)


@pytest.mark.parametrize("case", sorted(POISON))
def test_poison_records_get_invalid_argument_with_the_reason(
        stub: ingestion_pb2_grpc.IngestionStub, case: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Ingest(ingestion_pb2.IngestRequest(item=record_item("p1", POISON[case])), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith("invalid_record: ")


def test_a_trailing_newline_in_the_tenant_is_invalid(stub: ingestion_pb2_grpc.IngestionStub) -> None:
    item = items_pb2.Item(item_id="p1", tenant="acme\n", modality=items_pb2.TEXT, content=b"hi")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Ingest(ingestion_pb2.IngestRequest(item=item), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith("invalid_tenant: ")


def test_an_id_conflict_is_already_exists(stub: ingestion_pb2_grpc.IngestionStub) -> None:
    stub.Ingest(ingestion_pb2.IngestRequest(item=record_item("p1", b'{"a": 1}')), timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Ingest(ingestion_pb2.IngestRequest(item=record_item("p1", b'{"a": 2}')), timeout=30)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert str(caught.value.details()).startswith("id_conflict: ")


@pytest.mark.parametrize("case", sorted(POISON))
def test_one_bad_item_in_a_stream_of_ten_leaves_the_nine_accepted(
        stub: ingestion_pb2_grpc.IngestionStub, producer: FakeProducer, case: str) -> None:
    items = [record_item(f"r{i}", json.dumps({"name": f"n{i}"}).encode()) for i in range(10)]
    items[4] = record_item("r4", POISON[case])
    summary = stub.IngestStream(iter([ingestion_pb2.IngestRequest(item=i) for i in items]), timeout=30)
    assert summary.accepted == 9 and summary.rejected == 1
    assert list(summary.item_ids) == [f"r{i}" for i in range(10) if i != 4]
    assert [(r.index, r.item_id, r.reason) for r in summary.rejections] == [(4, "r4", "invalid_record")]
    published = {items_pb2.AcceptedItem.FromString(value).item.item_id for value in producer.values()}
    assert published == set(summary.item_ids)


def test_a_crash_inside_validation_rejects_that_item_only(
        stub: ingestion_pb2_grpc.IngestionStub, monkeypatch: pytest.MonkeyPatch) -> None:
    import twinstream.ingestion.service as service

    real: Callable[..., Any] = service.validate

    def crashing(item: items_pb2.Item, *args: Any, **kwargs: Any) -> str:
        if item.item_id == "boom":
            raise RecursionError("a bug nobody foresaw")
        return str(real(item, *args, **kwargs))

    monkeypatch.setattr(service, "validate", crashing)
    items = [record_item("ok", b'{"a": 1}'), record_item("boom", b'{"a": 2}')]
    summary = stub.IngestStream(iter([ingestion_pb2.IngestRequest(item=i) for i in items]), timeout=30)
    assert list(summary.item_ids) == ["ok"]
    assert [(r.index, r.reason) for r in summary.rejections] == [(1, "handler_error")]


def test_poison_on_items_raw_becomes_dead_letters_and_the_rest_is_accepted(
        ingestion: Ingestion) -> None:
    values = [record_item(f"k{i}", content).SerializeToString()
              for i, content in enumerate([b'{"a": 1}', *POISON.values()])]
    records = [ConsumerRecord(topic="items.raw", partition=0, leader_epoch=0, offset=offset,
                              timestamp=0, timestamp_type=0, key=None, value=value, headers=[],
                              checksum=None, serialized_key_size=0,
                              serialized_value_size=len(value), serialized_header_size=0)
               for offset, value in enumerate(values)]
    result = ingestion.handle_raw(records)
    assert [r.reason for r in result.rejected] == ["invalid_record"] * len(POISON)
    assert [r.item_id for r in result.rejected] == [f"k{i}" for i in range(1, len(values))]
    assert len(result.outputs) == 1
