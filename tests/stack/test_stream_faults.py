"""Faults on a live stack of its own: a poison record never blocks other tenants, an oversized
record is dead-lettered once without multiplying its neighbours, ingestion pushes back while
embedding lags, and a broker restart is recovered from with no operator (issue 15, cases 1, 3,
5 and 13). Each test fails on the code before the stream loop's error model."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2
from prometheus_client.parser import text_string_to_metric_families

from stack_helpers import read_decisions, start_stack, text
from twinstream.client import RETRY_PUSHBACK_KEY, pushback_s
from twinstream.common.kafka import TopicReader, ensure_topics, make_producer
from twinstream.devstack import LocalStack
from twinstream.v1 import items_pb2

pytestmark = pytest.mark.stack
MAX_LAG = 30  # the stack's ingestion backpressure bound, low so a test can cross it


@pytest.fixture(scope="module")
def faults(base_bundle: Path) -> Iterator[LocalStack]:
    running = start_stack(base_bundle, "stream-faults", prometheus=False, batch_size=16, extra_env={
        "TWINSTREAM_INGEST_MAX_LAG": str(MAX_LAG), "TWINSTREAM_LOOP_STALL_S": "5"})
    yield running
    running.stop()


def partition_of(key: str, partitions: int) -> int:
    """The partition kafka-python's default partitioner picks for ``key``."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def dead_letters(stack: LocalStack, markers: set[bytes], timeout_s: float = 90
                 ) -> dict[bytes, items_pb2.DeadLetter]:
    """The first dead letter whose payload contains each marker (a later stage wraps the
    original bytes in its own message; a long payload is cut to its head)."""
    settings = stack.settings()
    reader = TopicReader(settings, settings.topics.dlq)
    found: dict[bytes, items_pb2.DeadLetter] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(found) < len(markers):
            for record in reader.poll():
                letter = items_pb2.DeadLetter.FromString(record.value)
                for marker in markers - set(found):
                    if marker in letter.payload:
                        found[marker] = letter
    finally:
        reader.close()
    return found


def health(stack: LocalStack, service: str) -> int:
    with stack.channel(service) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)


def test_poison_records_never_block_canaries_in_other_tenants(faults: LocalStack, tenant: str) -> None:
    """Case 1/2: records that crash a handler are isolated and dead-lettered; the rest flow."""
    settings = faults.settings()
    poisons = {
        # a trailing newline in the tenant: Milvus rejects the filter expression in indexing
        "newline": text("p1", "poison one", tenant + "\n").SerializeToString(),
        # JSON nested 5000 deep: RecursionError in ingestion's validation
        "deep": items_pb2.Item(item_id="p2", tenant=tenant, collection="default",
                               modality=items_pb2.RECORD,
                               content=(b"[" * 5000) + (b"]" * 5000)).SerializeToString(),
    }
    # a canary in every partition, so each poison's partition also carries a good record
    canaries: list[str] = []
    tenants: list[str] = []
    for i in range(40):
        other = f"{tenant}c{i}"
        if partition_of(f"{other}/default", settings.topics.partitions) not in {
                partition_of(f"{t}/default", settings.topics.partitions) for t in tenants}:
            tenants.append(other)
    tenants += [f"{tenant}x{i}" for i in range(8 - len(tenants))]
    producer = make_producer(settings)
    for payload in poisons.values():
        producer.send(settings.topics.raw, key=b"poison", value=payload)
    for other in tenants:
        canary = text("canary", f"canary for {other}", other)
        canaries.append(other)
        producer.send(settings.topics.raw, key=other.encode(), value=canary.SerializeToString())
    producer.flush()
    producer.close()
    started = time.monotonic()
    for other in canaries:
        read_decisions(faults, ["canary"], other, timeout_s=max(5.0, 90 - (time.monotonic() - started)))
    assert time.monotonic() - started < 90, "every canary decided within a bounded time"
    # a second round lands behind the poison records in every partition, which isolates a
    # poison record that was alone in its batch (see common/kafka.py)
    producer = make_producer(settings)
    for other in tenants:
        producer.send(settings.topics.raw, key=other.encode(),
                      value=text("canary2", f"second canary {other}", other).SerializeToString())
    producer.flush()
    producer.close()
    for other in tenants:
        read_decisions(faults, ["canary2"], other, timeout_s=90)
    markers = {b"poison one", b"[" * 5000}
    letters = dead_letters(faults, markers)
    assert set(letters) == markers, "each poison record ends in items.dlq"
    for letter in letters.values():
        assert letter.reason and letter.detail


def test_an_oversized_raw_record_is_dead_lettered_once_and_its_neighbours_once(
        faults: LocalStack, tenant: str) -> None:
    """Case 3: a >8 MiB record's dead letter fits; the batch is not retried forever."""
    settings = faults.settings()
    big = text("huge", "x" * (9 * 1024 * 1024), tenant).SerializeToString()
    neighbours = [text(f"n{i}", f"neighbour item number {i}", tenant) for i in range(6)]
    producer = KafkaProducer(bootstrap_servers=list(settings.kafka.bootstrap),
                             max_request_size=16 * 1024 * 1024, enable_idempotence=False)
    key = f"{tenant}/default".encode()
    producer.send(settings.topics.raw, key=key, value=neighbours[0].SerializeToString())
    producer.send(settings.topics.raw, key=key, value=big)
    for item in neighbours[1:]:
        producer.send(settings.topics.raw, key=key, value=item.SerializeToString())
    producer.flush()
    producer.close()
    decisions = read_decisions(faults, [n.item_id for n in neighbours], tenant, timeout_s=120)
    time.sleep(3)  # let any (wrongly) repeated batch publish again
    decisions = read_decisions(faults, [n.item_id for n in neighbours], tenant, timeout_s=30)
    assert {item_id: len(copies) for item_id, copies in decisions.items()} == {
        n.item_id: 1 for n in neighbours}, "no neighbour was published twice"
    [letter] = dead_letters(faults, {big[:4096]}).values()
    assert letter.stage == "ingestion" and "payload truncated" in letter.detail
    assert len(letter.payload) < 8 * 1024 * 1024


def test_ingestion_pushes_back_while_embedding_lags_and_the_client_honours_it(
        faults: LocalStack, tenant: str) -> None:
    """Case 13: RESOURCE_EXHAUSTED with a retry-after past the lag bound; the client waits."""
    settings = faults.settings()
    faults.stop_service("embedding")
    try:
        producer = make_producer(settings)
        for i in range(MAX_LAG * 2):  # items.raw is not throttled: it fills items.accepted
            producer.send(settings.topics.raw, key=tenant.encode(),
                          value=text(f"b{i}", f"backlog item {i}", tenant).SerializeToString())
        producer.flush()
        producer.close()
        refused: grpc.RpcError | None = None
        with faults.client(retry_budget_s=0) as client:
            deadline = time.monotonic() + 60
            while refused is None and time.monotonic() < deadline:
                try:
                    client.ingest(text(f"probe{int(time.monotonic() * 1000)}", "probe", tenant))
                except grpc.RpcError as error:
                    refused = error
                time.sleep(0.5)
        assert refused is not None, "ingestion kept accepting past the lag bound"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "backpressure" in (refused.details() or "")
        assert any(d.key == RETRY_PUSHBACK_KEY for d in refused.trailing_metadata() or ())
        assert (pushback_s(refused) or 0) >= 1.0
    finally:
        faults.start_service("embedding")
    with faults.client(retry_budget_s=120) as client:
        client.ingest(text("after", "accepted once embedding caught up", tenant))
    read_decisions(faults, ["after", "b0", f"b{MAX_LAG * 2 - 1}"], tenant, timeout_s=180)


def scrape(stack: LocalStack, service: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` on the service's /metrics whose labels include ``labels``."""
    with urllib.request.urlopen(stack.metrics_url(service), timeout=5) as response:
        body = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def test_a_triton_outage_shows_in_lag_retries_and_health_and_recovers(
        faults: LocalStack, tenant: str) -> None:
    """Cases 9/13 and 11.3: while embedding cannot reach Triton its batch is retried with
    backoff, the lag keeps counting, health turns NOT_SERVING after the stall time (5 s here),
    and everything is decided once Triton is back, with no operator action."""
    assert faults.triton is not None
    settings = faults.settings()
    ids = [f"t{i}" for i in range(10)]
    faults.triton.stop()
    try:
        producer = make_producer(settings)
        for item_id in ids:
            producer.send(settings.topics.raw, key=tenant.encode(),
                          value=text(item_id, f"item {item_id} during the outage", tenant)
                          .SerializeToString())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 90
        while (health(faults, "embedding") != health_pb2.HealthCheckResponse.NOT_SERVING
               and time.monotonic() < deadline):
            time.sleep(0.5)
        assert health(faults, "embedding") == health_pb2.HealthCheckResponse.NOT_SERVING
        # Health may turn first on the Triton probe (common/probes.py, ~4 s); the loop's own stall
        # time reaches the 5 s threshold soon after.
        stall_deadline = time.monotonic() + 30
        while (scrape(faults, "embedding", "twinstream_stream_stalled_seconds") < 5
               and time.monotonic() < stall_deadline):
            time.sleep(0.5)
        assert scrape(faults, "embedding", "twinstream_stream_batch_retries_total", kind="transient") > 0
        assert scrape(faults, "embedding", "twinstream_stream_stalled_seconds") >= 5
        lag_deadline = time.monotonic() + 30
        while (scrape(faults, "embedding", "twinstream_stream_consumer_lag_records") < len(ids)
               and time.monotonic() < lag_deadline):
            time.sleep(0.5)
        assert scrape(faults, "embedding", "twinstream_stream_consumer_lag_records") >= len(ids), \
            "the lag counts the records waiting behind the failing batch"
    finally:
        faults.triton.start()
    read_decisions(faults, ids, tenant, timeout_s=120)
    faults.wait_serving("embedding", timeout_s=60)


def test_a_broker_restart_is_recovered_without_an_operator(faults: LocalStack, tenant: str) -> None:
    """Case 5: producers are not stuck, health shows the outage, a retried Ingest is decided."""
    with faults.client(retry_budget_s=0) as client:
        first = client.ingest(text("before", "published before the broker restart", tenant))
        assert not first.already_accepted
        read_decisions(faults, ["before"], tenant)
        faults.processes["broker"].stop()
        with pytest.raises(grpc.RpcError) as outage:
            client.ingest(text("during", "sent while the broker is down", tenant))
        assert outage.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health(faults, "ingestion") == health_pb2.HealthCheckResponse.NOT_SERVING
        faults.start_broker()
        ensure_topics(faults.settings())  # a memory:// broker lost its topics; a durable one did not
    with faults.client(retry_budget_s=0) as client:
        deadline = time.monotonic() + 120
        while True:  # the client's own retries: until the services have reconnected
            try:
                again = client.ingest(text("before", "published before the broker restart", tenant))
                during = client.ingest(text("during", "sent while the broker is down", tenant))
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(1)
    assert again.already_accepted and not during.already_accepted
    decisions = read_decisions(faults, ["before", "during"], tenant, timeout_s=180)
    assert len({c.SerializeToString() for c in decisions["before"]}) == 1, "repeats are identical"
    # The broker probe turns health back on its next success (probes.interval_s + timeout_s after
    # the broker answers), which can be just after the first decisions arrive.
    faults.wait_serving("ingestion", timeout_s=60)
    for service in ("embedding", "indexing"):
        faults.wait_serving(service, timeout_s=60)


def test_the_supervisor_revives_a_crashed_triton_and_items_are_decided(
        faults: LocalStack, tenant: str) -> None:
    """Case 13: the dev stack restarts a crashed Triton by itself (``stack up`` and ``demo
    --keep`` run ``supervise``; one revival round here), and items sent during the crash are
    decided once it is back."""
    assert faults.crashed() == []
    faults.crash("triton")
    assert faults.crashed() == ["triton"]
    with faults.client(retry_budget_s=0) as client:
        client.ingest(text("crashed", "sent while Triton was down", tenant))
    assert faults.revive_crashed() == ["triton"]
    assert faults.crashed() == []
    read_decisions(faults, ["crashed"], tenant, timeout_s=120)
