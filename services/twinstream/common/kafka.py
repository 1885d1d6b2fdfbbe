"""The consume-process-commit loop every Kafka-driven service runs, plus topic set-up.

Delivery is at-least-once: a batch's outputs (and dead letters) are produced and flushed, and
only then are its offsets committed. If the handler or the broker fails, the consumer seeks back
to the start of the batch and retries it with backoff; nothing is skipped. Records that can never
succeed (bad bytes, invalid content) go to the dead-letter topic with a reason, and the loop
moves on. Handlers must therefore be idempotent: a retried batch is processed again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from twinstream.common.config import Settings
from twinstream.common.metrics import (
    BATCH_SECONDS,
    BATCH_SIZE,
    CONSUMER_LAG,
    DEAD_LETTERS,
    ERRORS,
    ITEMS_PROCESSED,
)
from twinstream.v1 import items_pb2

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Outgoing:
    """A message to produce once the batch is done."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Rejected:
    """A record that can never be processed; it goes to the dead-letter topic."""

    record: ConsumerRecord
    reason: str
    detail: str
    item_id: str = ""


@dataclass
class BatchResult:
    outputs: list[Outgoing] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    # Runs once the outputs are acknowledged by the broker, before the offsets are committed.
    after_flush: Callable[[], None] | None = None


def parse_record(record: ConsumerRecord, message_type: type[M]) -> M | Rejected:
    """Decode a consumed record as ``message_type``, or the dead letter saying why it can't be."""
    message = message_type()
    try:
        message.ParseFromString(record.value or b"")
    except Exception as exc:  # protobuf's DecodeError and friends
        return Rejected(record, "malformed", f"not a {message_type.DESCRIPTOR.name}: {exc}")
    return message


class BatchHandler(Protocol):
    """Processes one batch of records; raises for transient failures (the batch is retried)."""

    def __call__(self, records: Sequence[ConsumerRecord]) -> BatchResult: ...


def make_producer(settings: Settings) -> KafkaProducer:
    """A producer that waits for the broker to acknowledge every write."""
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        client_id=f"{settings.service}-{settings.instance_id}",
        acks="all",
        linger_ms=5,
        retries=10,
        max_request_size=8 * 1024 * 1024,
    )


def ensure_topics(settings: Settings, timeout_s: float = 60.0) -> None:
    """Create the pipeline's topics if missing (the local stack and tests call this)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","))
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(t, settings.partitions, 1) for t in settings.topics.all() if t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(wanted)
    finally:
        admin.close()


def dead_letter(settings: Settings, rejected: Rejected) -> Outgoing:
    """Wrap a rejected record, its original bytes untouched, with the reason."""
    record = rejected.record
    letter = items_pb2.DeadLetter(
        stage=settings.service,
        reason=rejected.reason,
        detail=rejected.detail,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        key=record.key or b"",
        payload=record.value or b"",
        item_id=rejected.item_id,
        time_ms=int(time.time() * 1000),
    )
    return Outgoing(settings.topics.dlq, record.key or b"", letter.SerializeToString())


def publish(producer: KafkaProducer, messages: Sequence[Outgoing], timeout_s: float = 30.0) -> None:
    """Produce ``messages`` and wait until the broker acknowledged every one; raise otherwise."""
    futures = [producer.send(m.topic, key=m.key, value=m.value, headers=list(m.headers) or None)
               for m in messages]
    producer.flush(timeout=timeout_s)
    for future in futures:
        future.get(timeout=timeout_s)  # re-raises the send error, if any


class ConsumeLoop:
    """Polls ``topic`` in batches, runs the handler, produces, flushes, then commits."""

    def __init__(self, settings: Settings, topic: str, handler: BatchHandler,
                 producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self.topic = topic
        self.handler = handler
        self._owns_producer = producer is None
        self.producer = producer or make_producer(settings)
        self.consumer = KafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap.split(","),
            group_id=settings.consumer_group,
            client_id=f"{settings.service}-{settings.instance_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.batch_size,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(500, settings.kafka_session_timeout_ms // 3),
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            request_timeout_ms=max(30_000, settings.kafka_session_timeout_ms + 5_000),
            fetch_max_wait_ms=50,
        )
        self._lag_checked = 0.0
        self._lag_partitions: set[TopicPartition] = set()

    def run(self, stopping: threading.Event, on_ready: Callable[[], None] = lambda: None) -> None:
        """Process batches until ``stopping`` is set, then close cleanly."""
        backoff = 0.2
        ready = False
        try:
            while not stopping.is_set():
                records = self._poll_batch(stopping)
                if not ready:  # the first poll returns once the group join has completed
                    ready = True
                    on_ready()
                if not records:
                    self._update_lag()
                    continue
                started = time.perf_counter()
                try:
                    self._process(records)
                    backoff = 0.2
                except Exception as exc:
                    ERRORS.labels(self.settings.service, type(exc).__name__).inc()
                    log.warning("batch failed; retrying it", exc_info=True,
                                extra={"records": len(records), "backoff_s": backoff})
                    self._rewind(records)
                    stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                BATCH_SIZE.labels(self.settings.service).observe(len(records))
                BATCH_SECONDS.labels(self.settings.service).observe(time.perf_counter() - started)
                self._update_lag()
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.producer.flush(timeout=10)
        finally:
            self.consumer.close(autocommit=False)
            if self._owns_producer:
                self.producer.close(timeout=5)

    def _poll_batch(self, stopping: threading.Event) -> list[ConsumerRecord]:
        """Wait for the first record, then gather up to batch_size within batch_wait_ms."""
        records: list[ConsumerRecord] = []
        deadline: float | None = None
        while len(records) < self.settings.batch_size and not stopping.is_set():
            left = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            timeout_ms = int(left * 1000)
            polled = self.consumer.poll(
                timeout_ms=timeout_ms, max_records=self.settings.batch_size - len(records)
            )
            for batch in polled.values():
                records.extend(batch)
            if deadline is None:
                if not records:
                    return records
                deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
            elif time.monotonic() >= deadline or not polled:
                break
        return sorted(records, key=lambda r: (r.partition, r.offset))

    def _process(self, records: list[ConsumerRecord]) -> None:
        result = self.handler(records)
        service = self.settings.service
        outgoing = result.outputs + [dead_letter(self.settings, r) for r in result.rejected]
        publish(self.producer, outgoing)
        for rejected in result.rejected:
            DEAD_LETTERS.labels(service, rejected.reason).inc()
            ERRORS.labels(service, rejected.reason).inc()
        if result.after_flush is not None:
            result.after_flush()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for record in records:
            offsets[TopicPartition(record.topic, record.partition)] = OffsetAndMetadata(
                record.offset + 1, "", -1
            )
        try:
            self.consumer.commit(offsets)
        except CommitFailedError:
            # The group rebalanced under us; the new owner re-processes this batch (idempotently).
            ERRORS.labels(service, "commit_failed").inc()
            log.warning("offset commit failed after a rebalance", extra={"records": len(records)})
            return
        ITEMS_PROCESSED.labels(service, "ok").inc(len(records) - len(result.rejected))
        ITEMS_PROCESSED.labels(service, "dead_letter").inc(len(result.rejected))

    def _rewind(self, records: list[ConsumerRecord]) -> None:
        """Seek every partition of the failed batch back to its first record."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_checked < 2.0:
            return
        self._lag_checked = now
        assigned = list(self.consumer.assignment())
        for lost in self._lag_partitions - set(assigned):  # moved to another replica
            CONSUMER_LAG.remove(self.settings.service, lost.topic, str(lost.partition))
        self._lag_partitions = set(assigned)
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(assigned)
        except KafkaError:
            return
        for tp in assigned:
            try:
                position = self.consumer.position(tp)
            except KafkaError:
                continue
            lag = max(0, (ends.get(tp) or 0) - (position or 0))
            CONSUMER_LAG.labels(self.settings.service, tp.topic, str(tp.partition)).set(lag)


class TopicReader:
    """Reads a topic from the beginning without a consumer group (tools, reports and tests)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap.split(","),
            enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100,
        )
        partitions = None
        deadline = time.monotonic() + 30
        while not partitions and time.monotonic() < deadline:
            partitions = self.consumer.partitions_for_topic(topic)
            if not partitions:
                time.sleep(0.2)
        self.partitions = [TopicPartition(topic, p) for p in sorted(partitions or [])]
        self.consumer.assign(self.partitions)
        self.consumer.seek_to_beginning(*self.partitions)

    def poll(self, timeout_ms: int = 200) -> list[ConsumerRecord]:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        return [r for batch in polled.values() for r in batch]

    def read_until(self, done: Callable[[list[ConsumerRecord]], bool],
                   timeout_s: float) -> list[ConsumerRecord]:
        """Collect records until ``done(all_so_far)`` or the timeout."""
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records.extend(self.poll())
            if done(records):
                break
        return records

    def close(self) -> None:
        self.consumer.close()
