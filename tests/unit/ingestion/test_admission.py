"""Ingestion's admission over a real in-process gRPC server: backpressure with a retry-after the
client honours, publish-then-mark, and a retry that publishes again (issue 15, cases 5 and 13).
The broker is an in-memory producer (a unit test of the Ingestion servicer and the client)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kafka.errors import KafkaTimeoutError

from twinstream.client import TwinstreamClient, pushback_s, text_item
from twinstream.common.config import Settings
from twinstream.common.kafka import Producer
from twinstream.common.security import ClientCredentials
from twinstream.ingestion.service import Backpressure, Ingestion
from twinstream.ingestion.store import AcceptedIds
from twinstream.v1 import ingestion_pb2_grpc, items_pb2
from unit.fake_kafka import FakeProducer


@dataclass
class Served:
    client: TwinstreamClient
    producer: FakeProducer
    gate: Backpressure
    health: list[bool]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    settings = Settings(service="ingestion", limits={"ingest_max_lag": 100})
    producer = FakeProducer()
    gate = Backpressure(settings.limits.ingest_max_lag, lambda: None)
    health: list[bool] = []
    ids = AcceptedIds(tmp_path / "ids.sqlite")
    service = Ingestion(settings, ids, Producer(lambda: producer), gate, health.append)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingestion_pb2_grpc.add_IngestionServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = TwinstreamClient(f"127.0.0.1:{port}", timeout_s=10, retry_budget_s=0,
                              credentials=ClientCredentials.plaintext())
    try:
        yield Served(client, producer, gate, health)
    finally:
        client.close()
        server.stop(0)
        ids.close()


def item(item_id: str) -> items_pb2.Item:
    return text_item(item_id, f"text of {item_id}", "acme")


def test_past_the_lag_bound_ingest_is_refused_with_a_retry_after(served: Served) -> None:
    served.gate.lag = 400  # three times over the bound of 100
    with pytest.raises(grpc.RpcError) as refused:
        served.client.ingest(item("a"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pushback_s(refused.value) == 10.0
    with pytest.raises(grpc.RpcError) as refused_stream:
        served.client.ingest_many([item("b"), item("c")])
    assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not served.producer.sent, "nothing was admitted"
    served.gate.lag = 100  # at the bound: admitted
    assert served.client.ingest(item("a")).item_id == "a"


def test_the_client_waits_the_retry_after_and_retries(served: Served) -> None:
    served.gate.lag = 150  # 1 s retry-after
    served.client.retry_budget_s = 30
    # the gate's own thread is not running: clear the lag once the first refusal was sent
    original = served.gate.retry_after_s

    def once() -> float | None:
        wait = original()
        served.gate.lag = 0
        return wait
    served.gate.retry_after_s = once  # type: ignore[method-assign]
    assert served.client.ingest(item("late")).item_id == "late"
    assert len(served.producer.sent) == 1


def test_a_failed_publish_is_not_marked_published_and_a_retry_publishes_again(
        served: Served) -> None:
    served.producer.fail_with = KafkaTimeoutError("no ack")
    with pytest.raises(grpc.RpcError) as outage:
        served.client.ingest(item("x"))
    assert outage.value.code() == grpc.StatusCode.UNAVAILABLE
    assert served.health == [False]
    served.producer.fail_with = None
    first = served.client.ingest(item("x"))
    assert not first.already_accepted, "the failed attempt left no published mark"
    again = served.client.ingest(item("x"))
    assert again.already_accepted and served.health[-1] is True, "healthy once it publishes"
    assert len(served.producer.sent) == 2, "a retry publishes again (the broker may have lost it)"
    assert served.producer.values()[0] == served.producer.values()[1], "identical each time"
