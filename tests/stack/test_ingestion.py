"""Ingestion against the running stack: gRPC statuses and dead letters with reasons."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from stack_helpers import read_decisions, text
from twinstream.client import TwinstreamClient
from twinstream.common.kafka import TopicReader, make_producer
from twinstream.devstack import LocalStack
from twinstream.v1 import ingestion_pb2, items_pb2

pytestmark = pytest.mark.stack


@pytest.fixture
def client(stack: LocalStack) -> Iterator[TwinstreamClient]:
    with stack.client() as c:
        yield c


BAD_ITEMS = {
    "empty_payload": dict(content=b""),
    "oversize": dict(content=b"x" * 1_048_577),
    "unknown_modality": dict(modality=7),
    "invalid_utf8": dict(content=b"\xc3\x28 broken"),
    "missing_id": dict(item_id=""),
}


@pytest.mark.parametrize("reason", sorted(BAD_ITEMS))
def test_bad_items_get_invalid_argument_with_the_reason(client: TwinstreamClient, tenant: str,
                                                         reason: str) -> None:
    candidate = text("x1", "hello", tenant)
    for field, value in BAD_ITEMS[reason].items():
        setattr(candidate, field, value)
    with pytest.raises(grpc.RpcError) as caught:
        client.ingest(candidate)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(reason)


def test_same_id_same_content_is_idempotent_and_other_content_conflicts(
        client: TwinstreamClient, tenant: str) -> None:
    first = client.ingest(text("dup-id", "the first content", tenant))
    again = client.ingest(text("dup-id", "the first content", tenant))
    assert not first.already_accepted and again.already_accepted
    assert again.content_hash == first.content_hash
    with pytest.raises(grpc.RpcError) as caught:
        client.ingest(text("dup-id", "different content", tenant))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "id_conflict" in caught.value.details()


def test_stream_reports_each_bad_item_and_accepts_the_rest(client: TwinstreamClient,
                                                           stack: LocalStack, tenant: str) -> None:
    items = [text("s1", "alpha", tenant), text("", "no id", tenant),
             text("s2", "beta", tenant), text("s3", "", tenant)]
    summary = client.ingest_many(items)
    assert (summary.accepted, summary.rejected) == (2, 2)
    assert list(summary.item_ids) == ["s1", "s2"]
    assert [(r.index, r.reason) for r in summary.rejections] == [(1, "missing_id"),
                                                                  (3, "empty_payload")]
    assert set(read_decisions(stack, ["s1", "s2"], tenant)) == {"s1", "s2"}


def test_assigned_ids_are_deterministic(client: TwinstreamClient, tenant: str) -> None:
    item = text("", "content without an id", tenant)
    first = client.ingest(item, assign_id=True)
    second = client.ingest(text("", "content without an id", tenant), assign_id=True)
    assert first.item_id == second.item_id and second.already_accepted


def test_bad_kafka_records_become_dead_letters_and_the_loop_moves_on(stack: LocalStack,
                                                                    tenant: str) -> None:
    settings = stack.settings()
    good = text("k-good", "a valid item after the bad ones", tenant)
    conflicting = text("k-good", "same id, other content", tenant)
    bad = {
        "malformed": b"\xff\xfe\xfd not protobuf",
        "empty_payload": b"",
        "invalid_utf8": text("k-u", "x", tenant).SerializeToString().replace(b"x", b"\xff"),
        "missing_id": text("", "no id", tenant).SerializeToString(),
    }
    producer = make_producer(settings)
    for payload in bad.values():
        producer.send(settings.topics.raw, key=tenant.encode(), value=payload)
    producer.send(settings.topics.raw, key=tenant.encode(), value=good.SerializeToString())
    producer.flush()
    read_decisions(stack, ["k-good"], tenant)
    producer.send(settings.topics.raw, key=tenant.encode(), value=conflicting.SerializeToString())
    producer.flush()
    producer.close()
    reader = TopicReader(settings, settings.topics.dlq)
    letters: dict[str, items_pb2.DeadLetter] = {}
    deadline = time.monotonic() + 60
    raw_payloads = set(bad.values()) | {conflicting.SerializeToString()}
    while time.monotonic() < deadline and len(letters) < len(bad) + 1:
        for record in reader.poll():
            letter = items_pb2.DeadLetter.FromString(record.value)
            if letter.payload in raw_payloads and letter.stage == "ingestion":
                letters[letter.reason] = letter
    reader.close()
    assert set(letters) == {*bad, "id_conflict"}
    for reason, payload in bad.items():
        assert letters[reason].payload == payload, "the original bytes are kept untouched"
        assert letters[reason].source_topic == settings.topics.raw and letters[reason].detail
    assert letters["id_conflict"].item_id == "k-good"


def test_ingest_request_round_trips_metadata(client: TwinstreamClient, stack: LocalStack,
                                             tenant: str) -> None:
    request_item = text("meta-1", "with metadata", tenant, colour="red")
    client.ingestion.Ingest(ingestion_pb2.IngestRequest(item=request_item), timeout=10)
    decision = read_decisions(stack, ["meta-1"], tenant)["meta-1"][0]
    stored = client.get(tenant, "meta-1")
    assert stored.metadata["colour"] == "red"
    assert stored.decision.SerializeToString() == decision.SerializeToString()
