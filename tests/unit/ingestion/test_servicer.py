"""The Ingestion servicer in-process (grpc_testing) behind the real interceptor, with a fake
broker from a factory fixture and the real SQLite id store in a temporary folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import grpc_testing
import pytest
from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from twinstream.common.config import Settings
from twinstream.common.kafka import Producer
from twinstream.common.metrics import Metrics
from twinstream.ingestion.service import Ingestion
from twinstream.ingestion.store import AcceptedIds
from twinstream.v1 import ingestion_pb2, items_pb2
from unit.fake_kafka import FakeProducer
from unit.in_process import serve, stream_in, unary

SERVICE = ingestion_pb2.DESCRIPTOR.services_by_name["Ingestion"]


# kafka-python raises this from send() when the broker cannot be reached
UNREACHABLE = KafkaTimeoutError("Failed to update metadata after 15.0 secs.")

Served = tuple[grpc_testing.Server, FakeProducer, Metrics]
MakeServed = Callable[..., Served]


@pytest.fixture
def make_ingestion(tmp_path: Path) -> Iterator[MakeServed]:
    """Factory: an in-process Ingestion server over a fake broker, counting on a fresh registry."""
    stores: list[AcceptedIds] = []

    def make(down: bool = False) -> Served:
        broker, metrics = FakeProducer(refuse_with=UNREACHABLE if down else None), Metrics.create(CollectorRegistry())
        stores.append(AcceptedIds(tmp_path / f"ids-{len(stores)}.sqlite"))
        service = Ingestion(Settings(service="ingestion"), stores[-1], Producer(lambda: broker),  # type: ignore[arg-type, return-value]
                            metrics=metrics)
        return serve(service, SERVICE, metrics), broker, metrics
    yield make
    for store in stores:
        store.close()


def text(item_id: str, tenant: str = "acme", content: bytes = b"a lamp") -> ingestion_pb2.IngestRequest:
    return ingestion_pb2.IngestRequest(item=items_pb2.Item(
        item_id=item_id, tenant=tenant, modality=items_pb2.TEXT, content=content))


def handled(metrics: Metrics, method: str, code: str, grpc_type: str = "unary") -> float:
    return metrics.registry.get_sample_value("twinstream_grpc_server_handled_total", {
        "grpc_type": grpc_type, "grpc_service": SERVICE.full_name, "grpc_method": method,
        "grpc_code": code}) or 0.0


def test_a_valid_item_is_published_and_counted(make_ingestion: MakeServed) -> None:
    server, broker, metrics = make_ingestion()
    response, code, _details = unary(server, SERVICE, "Ingest", text("i1"))
    assert code == grpc.StatusCode.OK
    assert response.item_id == "i1" and not response.already_accepted
    assert [s.topic for s in broker.sent] == ["items.accepted"]
    assert items_pb2.AcceptedItem.FromString(broker.sent[0].value).item.item_id == "i1"
    assert handled(metrics, "Ingest", "OK") == 1
    assert metrics.registry.get_sample_value("twinstream_items_processed_total",
                                             {"outcome": "accepted"}) == 1


def test_a_bad_item_is_invalid_argument_with_its_reason(make_ingestion: MakeServed) -> None:
    server, broker, metrics = make_ingestion()
    _response, code, details = unary(server, SERVICE, "Ingest", text("i1", tenant=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("missing_tenant: ") or details.startswith("invalid_tenant: "), details
    assert not broker.sent
    assert handled(metrics, "Ingest", "INVALID_ARGUMENT") == 1


def test_a_broker_outage_is_unavailable_and_the_id_stays_free(make_ingestion: MakeServed) -> None:
    server, broker, _metrics = make_ingestion(down=True)
    _response, code, details = unary(server, SERVICE, "Ingest", text("i1"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "broker" in details
    broker.refuse_with = None
    response, code, _details = unary(server, SERVICE, "Ingest", text("i1"))
    assert code == grpc.StatusCode.OK and not response.already_accepted


def test_a_stream_reports_each_bad_item_and_publishes_the_rest(make_ingestion: MakeServed) -> None:
    server, broker, metrics = make_ingestion()
    summary, code, _details = stream_in(server, SERVICE, "IngestStream",
                                        [text("a"), text("b", content=b""), text("c")])
    assert code == grpc.StatusCode.OK
    assert list(summary.item_ids) == ["a", "c"]
    assert [(r.index, r.item_id) for r in summary.rejections] == [(1, "b")]
    assert len(broker.sent) == 2
    assert handled(metrics, "IngestStream", "OK", "client_stream") == 1
