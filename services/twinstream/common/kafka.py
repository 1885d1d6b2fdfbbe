"""The consume-process-commit loop every Kafka-driven service runs, plus topic set-up.

Delivery is at-least-once: a batch's outputs (and dead letters) are produced and flushed, and
only then are its offsets committed. Handlers must be idempotent: a retried batch runs again.
Failures follow the error model of common/errors.py:

- ``TransientError`` (broker, Milvus or Triton unavailable): the batch's partitions are paused
  and sought back to the batch's start, and retried after an exponential backoff. The loop
  keeps polling meanwhile, so other partitions proceed and lag stays current.
- ``PermanentError`` or any unknown exception: the batch is split in halves until the failing
  record is alone; it goes to the dead-letter topic (``PermanentError``'s reason, or
  ``handler_error`` with the exception text) and the rest of the batch proceeds. Only when no
  record of the batch succeeds is an unknown failure retried like a transient one: that looks
  like an outage nobody classified, not like poison, and dead-lettering a whole batch of good
  records would be worse than waiting. The next record behind a lone poison record isolates it.
- A loop that has made no progress for ``loop_stall_s`` reports itself unhealthy (gRPC health
  NOT_SERVING) until a retried batch succeeds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
)
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from twinstream.common.config import Settings
from twinstream.common.errors import PermanentError, TransientError
from twinstream.common.metrics import Metrics
from twinstream.common.security import kafka_client_options
from twinstream.v1 import items_pb2

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

# The producer's request limit; a dead letter is cut down to fit well within it.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_DETAIL_CHARS = 4096
# kafka-python 3.0's position() and commit() wait without end by default: position() of a
# partition without one (after a rebalance) fetches its committed offset, retrying while the
# coordinator is away. The loop's thread must not hang in either: a commit that times out is a
# transient failure (the batch is retried, idempotently); a position read for the lag or the
# fetch-stall check is skipped until the next turn.
COMMIT_TIMEOUT_MS = 30_000
POSITION_TIMEOUT_MS = 200


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

    def extend(self, other: BatchResult) -> None:
        """Append ``other`` (a later part of the same batch), keeping both after_flush hooks."""
        self.outputs.extend(other.outputs)
        self.rejected.extend(other.rejected)
        hooks = [h for h in (self.after_flush, other.after_flush) if h is not None]
        if len(hooks) > 1:
            def run_all() -> None:
                for hook in hooks:
                    hook()
            self.after_flush = run_all
        elif hooks:
            self.after_flush = hooks[0]


def parse_record(record: ConsumerRecord, message_type: type[M]) -> M | Rejected:
    """Decode a consumed record as ``message_type``, or the dead letter saying why it can't be."""
    message = message_type()
    try:
        message.ParseFromString(record.value or b"")
    except Exception as exc:  # protobuf's DecodeError and friends
        return Rejected(record, "malformed", f"not a {message_type.DESCRIPTOR.name}: {exc}")
    return message


class BatchHandler(Protocol):
    """Processes one batch of records.

    Raises ``TransientError`` when a dependency is down (the batch is retried); a bad record is
    returned as ``Rejected`` or, if the handler cannot tell which, raises and is isolated.
    """

    def __call__(self, records: Sequence[ConsumerRecord]) -> BatchResult: ...


def make_producer(settings: Settings, metrics: Metrics | None = None) -> Producer:
    """A producer that waits for the broker to acknowledge every write, and is rebuilt after a
    non-retriable error (see ``Producer``).

    Idempotence is off: kafka-python 3 turns it on by default, and a broker that loses its
    producer state (a restart) leaves such a producer failing for good. Every downstream write
    is idempotent, so a duplicate from a retried send costs nothing; one request in flight per
    connection keeps each partition's order through retries.

    ``batch_size`` is the most bytes of one partition's records in one produce request: at
    kafka-python's 16 KiB default a flushed 64-item batch of embeddings (~3 KiB each) went out as
    several requests one after another (one in flight), each a storage write on an S3-backed
    tansu (docs/bench/throughput.md).
    """
    return Producer(lambda: KafkaProducer(
        bootstrap_servers=list(settings.kafka.bootstrap),
        **kafka_client_options(settings),
        client_id=f"{settings.service}-{settings.server.instance_id}",
        acks="all",
        linger_ms=5,
        retries=10,
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        max_request_size=MAX_REQUEST_BYTES,
        batch_size=settings.kafka.producer_batch_bytes,
    ), metrics)


class Producer:
    """A KafkaProducer that ``publish`` closes and builds afresh after a non-retriable error.

    kafka-python gives up on a send for good when the broker answers with an error it does not
    class as retriable (``UnknownError`` while the broker's storage is down, a fenced or
    aborted producer state): a producer in that state can stay broken after the broker is
    healthy again. A fresh one costs a reconnect, so ``publish`` rebuilds on every such error
    and the caller retries the whole batch (at-least-once; downstream writes are idempotent).
    Shared between threads (ingestion's API and its stream loop): sends go to the current
    producer; one rebuild at a time.
    """

    def __init__(self, build: Callable[[], KafkaProducer], metrics: Metrics | None = None) -> None:
        self._build = build
        self.metrics = metrics or Metrics.unexported()
        self._lock = threading.Lock()
        self._producer = build()

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> FutureRecordMetadata:
        return self._producer.send(topic, key=key, value=value, headers=headers)

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self._producer.close(timeout=timeout)

    def rebuild(self, broken: KafkaProducer | None = None) -> None:
        """Close the current producer (without waiting) and build a new one; a no-op when
        ``broken`` was already replaced by another thread."""
        with self._lock:
            if broken is not None and broken is not self._producer:
                return
            old = self._producer
            self._producer = self._build()
        self.metrics.producer_rebuilds.inc()
        log.warning("producer rebuilt after a non-retriable error")
        try:
            old.close(timeout=0)
        except Exception:  # a producer in a broken state may fail to close; it is dropped anyway
            log.debug("closing the broken producer failed", exc_info=True)

    @property
    def current(self) -> KafkaProducer:
        return self._producer


def ensure_topics(settings: Settings, timeout_s: float = 60.0) -> None:
    """Create the pipeline's topics if missing (the local stack and tests call this)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=list(settings.kafka.bootstrap),
                                     **kafka_client_options(settings))
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(t, settings.topics.partitions, 1) for t in settings.topics.all() if t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(wanted)
    finally:
        admin.close()


def dead_letter(settings: Settings, rejected: Rejected) -> Outgoing:
    """Wrap a rejected record with the reason; its bytes untouched unless too big to carry.

    A payload over ``dead_letter_max_bytes`` is cut to that many leading bytes and the detail
    says so (with the original size and sha256), so a letter always fits the producer's request
    limit: a dead letter that cannot be written would block its partition.
    """
    record = rejected.record
    payload = record.value or b""
    key = record.key or b""
    detail = rejected.detail
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS] + f"... [{len(rejected.detail)} chars]"
    limit = settings.loop.dead_letter_max_bytes
    if len(payload) > limit:
        detail += (f" [payload truncated: {len(payload)} bytes, sha256 "
                   f"{hashlib.sha256(payload).hexdigest()}; the first {limit} kept]")
        payload = payload[:limit]
    if len(key) > limit:
        detail += f" [key truncated: {len(key)} bytes; the first {limit} kept]"
        key = key[:limit]
    letter = items_pb2.DeadLetter(
        stage=settings.service,
        reason=rejected.reason,
        detail=detail,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        key=key,
        payload=payload,
        item_id=rejected.item_id[:256],
        time_ms=int(time.time() * 1000),
    )
    return Outgoing(settings.topics.dlq, key, letter.SerializeToString())


def publish(producer: Producer, messages: Sequence[Outgoing], timeout_s: float = 30.0) -> None:
    """Produce ``messages`` and wait until the broker acknowledged every one.

    Raises TransientError when the broker did not take them (down, restarting, timed out); after
    an error kafka-python does not retry itself (not ``retriable``), the producer is rebuilt
    first, so the caller's retry runs on a fresh one.
    """
    current = producer.current
    try:
        futures = [producer.send(m.topic, key=m.key, value=m.value,
                                  headers=list(m.headers) or None) for m in messages]
        producer.flush(timeout=timeout_s)
        for future in futures:
            future.get(timeout=timeout_s)  # re-raises the send error, if any
    except (KafkaError, TimeoutError) as exc:
        if isinstance(exc, KafkaError) and not exc.retriable:
            producer.rebuild(current)
        raise TransientError(f"the broker did not acknowledge the batch: {exc!r}") from exc


@dataclass
class _Isolated:
    """A batch run with isolation: the combined result and the records that failed alone."""

    result: BatchResult = field(default_factory=BatchResult)
    failed: list[tuple[ConsumerRecord, Exception]] = field(default_factory=list)
    succeeded: int = 0


class _Unisolated(Exception):
    """Every record of a batch failed with an unknown error: retried, not dead-lettered."""


class _OnRebalance(ConsumerRebalanceListener):
    """Calls ``hook`` whenever the group takes partitions from or gives partitions to this member."""

    def __init__(self, hook: Callable[[], None]) -> None:
        self.hook = hook

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.hook()

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.hook()


class ConsumeLoop:
    """Polls ``topic`` in batches, runs the handler, produces, flushes, then commits.

    ``on_rebalance`` runs (on the loop's thread, between batches) whenever the partitions this
    member owns change: a handler that caches what only the owner of a partition writes drops
    it there. The offset commit is asynchronous by default (``kafka_async_commit``): it is
    sent after the batch's outputs are acknowledged, as a synchronous one would be, but the
    next batch does not wait for the broker's answer; a failed commit is repeated by the next
    one (offsets are cumulative), and a rebalance in between replays the batch idempotently.
    """

    def __init__(self, settings: Settings, topic: str, handler: BatchHandler,
                 producer: Producer | None = None, consumer: KafkaConsumer | None = None,
                 on_health: Callable[[bool], None] | None = None,
                 metrics: Metrics | None = None,
                 on_rebalance: Callable[[], None] | None = None,
                 consumer_factory: Callable[[], KafkaConsumer] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics.unexported()
        self.topic = topic
        self.handler = handler
        self.on_health = on_health or (lambda healthy: None)
        self._owns_producer = producer is None
        self.producer = producer or make_producer(settings)
        self._on_rebalance = on_rebalance or (lambda: None)
        # How to make the consumer again when its fetching is stuck (see _check_fetching); an
        # injected consumer without a factory is only reported.
        self._consumer_factory = consumer_factory or (None if consumer else lambda: self._new_consumer(topic))
        self.consumer = consumer or self._new_consumer(topic)
        self._lag_checked = 0.0
        self._lag_partitions: set[TopicPartition] = set()
        self._backoff = 0.0               # the delay before the next retry; 0 after a success
        self._resume_at = 0.0             # when the paused partitions are retried
        self._failing_since: float | None = None
        self._behind_since: float | None = None   # records wait, yet polls return none
        self._poll_failing_since: float | None = None  # polls raise (the broker is away)
        self._healthy = True
        self._uncommitted: dict[TopicPartition, OffsetAndMetadata] = {}  # sent async, unanswered

    def _rebalanced(self) -> None:
        # Offsets of partitions that may now be another member's are never committed again at
        # close: that could move the new owner's committed offset back.
        self._uncommitted.clear()
        self._on_rebalance()

    def _new_consumer(self, topic: str) -> KafkaConsumer:
        """A consumer in this loop's group, subscribed to ``topic`` with the rebalance listener."""
        settings = self.settings
        consumer = KafkaConsumer(
            bootstrap_servers=list(settings.kafka.bootstrap),
            **kafka_client_options(settings),
            group_id=settings.consumer_group,
            client_id=f"{settings.service}-{settings.server.instance_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.loop.batch_size,
            session_timeout_ms=settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=max(500, settings.kafka.session_timeout_ms // 3),
            max_poll_interval_ms=settings.kafka.max_poll_interval_ms,
            request_timeout_ms=max(30_000, settings.kafka.session_timeout_ms + 5_000),
            fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
        )
        consumer.subscribe([topic], listener=_OnRebalance(self._rebalanced))
        return consumer

    def run(self, stopping: threading.Event, on_ready: Callable[[], None] = lambda: None) -> None:
        """Process batches until ``stopping`` is set, then close cleanly."""
        ready = False
        try:
            while not stopping.is_set():
                self._resume_due()
                try:
                    records = self._poll_batch(stopping)
                except KafkaError as exc:
                    self._poll_failed(exc)
                    stopping.wait(self._backoff)
                    self._report_stall()
                    continue
                self._poll_failing_since = None
                if not ready:  # the first poll returns once the group join has completed
                    ready = True
                    on_ready()
                if records:
                    self.step(records)
                elif not self.consumer.paused() and not self._check_fetching():
                    self._progressed()  # idle with nothing pending is not a stall
                self._update_lag()
                self._report_stall()
        finally:
            self.close()

    def _poll_failed(self, exc: KafkaError) -> None:
        """A poll raised: the broker went away under it (kafka-python 3.0 raises a connection
        error from a poll that was looking up the coordinator or the committed offsets when the
        broker was killed; uncaught it ended the service). Nothing was handed out, so nothing
        is lost: count it as no progress, back off, and once polls have failed for
        ``loop_fetch_stall_s`` make the consumer again (it rejoins from the committed offsets)."""
        now = time.monotonic()
        self.metrics.errors.labels(type(exc).__name__).inc()
        delay = self._back_off()
        log.warning("poll failed; polling again", extra={"error": repr(exc), "retry_in_s": delay})
        if self._poll_failing_since is None:
            self._poll_failing_since = now
        elif now - self._poll_failing_since >= self.settings.loop.fetch_stall_s:
            self._poll_failing_since = None
            self._remake_consumer("polls keep failing")

    def _remake_consumer(self, why: str) -> None:
        """Close the consumer and make it again (kept when it cannot be made now, or when the
        loop was given a consumer without a factory)."""
        log.error("making the consumer again" if self._consumer_factory else "the consumer should be made again",
                  extra={"why": why})
        if self._consumer_factory is None:
            return
        try:
            fresh = self._consumer_factory()
        except KafkaError:  # the broker is unreachable now: keep the old one, try again later
            log.warning("could not make a new consumer", exc_info=True)
            return
        with contextlib.suppress(KafkaError):
            self.consumer.close(autocommit=False)
        self.consumer = fresh

    def step(self, records: list[ConsumerRecord]) -> bool:
        """Process one polled batch; on failure schedule its retry. True when it committed."""
        started = time.perf_counter()
        try:
            self._process(records)
        except (TransientError, _Unisolated) as exc:
            kind = "transient" if isinstance(exc, TransientError) else "unisolated"
            retry_after = getattr(exc, "retry_after_s", None)
            self._retry_later(records, exc, kind, retry_after)
            return False
        except Exception as exc:  # a failure of the loop itself (e.g. an after_flush hook)
            self._retry_later(records, exc, "unknown", None)
            return False
        self.metrics.batch_records.observe(len(records))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        if not self.consumer.paused():
            self._progressed()
        return True

    def close(self) -> None:
        try:
            self.producer.flush(timeout=10)
            if self._uncommitted:  # the last async commit may still be on its way: repeat it
                with contextlib.suppress(KafkaError):
                    self.consumer.commit(dict(self._uncommitted), timeout_ms=COMMIT_TIMEOUT_MS)
        finally:
            self.consumer.close(autocommit=False)
            if self._owns_producer:
                self.producer.close(timeout=5)

    def _poll_batch(self, stopping: threading.Event) -> list[ConsumerRecord]:
        """Wait for the first record, then gather up to batch_size within batch_wait_ms."""
        records: list[ConsumerRecord] = []
        deadline: float | None = None
        while len(records) < self.settings.loop.batch_size and not stopping.is_set():
            if deadline is None:
                left = 0.5
                if self._resume_at:
                    left = min(left, max(0.0, self._resume_at - time.monotonic()))
            else:
                left = max(0.0, deadline - time.monotonic())
            try:
                polled = self.consumer.poll(
                    timeout_ms=int(left * 1000), max_records=self.settings.loop.batch_size - len(records)
                )
            except KafkaError:
                if not records:
                    raise
                # The consumer's position is already past what earlier polls returned: process
                # them (dropping them here would let the next commit pass over them).
                break
            for batch in polled.values():
                records.extend(batch)
            if deadline is None:
                if not records:
                    return records
                deadline = time.monotonic() + self.settings.loop.batch_wait_ms / 1000
            elif time.monotonic() >= deadline or not polled:
                break
        return sorted(records, key=lambda r: (r.partition, r.offset))

    def _process(self, records: list[ConsumerRecord]) -> None:
        isolated = self._isolate(records)
        unknown = [exc for _, exc in isolated.failed if not isinstance(exc, PermanentError)]
        if unknown and not isolated.succeeded:
            raise _Unisolated(f"all {len(records)} records failed: {unknown[0]!r}") from unknown[0]
        result = isolated.result
        for record, exc in isolated.failed:
            if isinstance(exc, PermanentError):
                result.rejected.append(Rejected(record, exc.reason, exc.detail))
            else:
                log.error("record isolated as the cause of a handler error", exc_info=exc,
                          extra={"topic": record.topic, "partition": record.partition,
                                 "offset": record.offset})
                result.rejected.append(Rejected(record, "handler_error",
                                                f"{type(exc).__name__}: {exc}"))
        metrics = self.metrics
        outgoing = result.outputs + [dead_letter(self.settings, r) for r in result.rejected]
        publish(self.producer, outgoing)
        for rejected in result.rejected:
            metrics.dead_letters.labels(rejected.reason).inc()
            metrics.errors.labels(rejected.reason).inc()
        if result.after_flush is not None:
            result.after_flush()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for record in records:
            offsets[TopicPartition(record.topic, record.partition)] = OffsetAndMetadata(
                record.offset + 1, "", -1
            )
        if self.settings.kafka.async_commit:
            self._commit_async(offsets)
            self._count(records, result)
            return
        try:
            self.consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
        except CommitFailedError:
            # The group rebalanced under us; the new owner re-processes this batch (idempotently).
            metrics.errors.labels("commit_failed").inc()
            log.warning("offset commit failed after a rebalance", extra={"records": len(records)})
            return
        except KafkaError as exc:
            raise TransientError(f"the offset commit failed: {exc!r}") from exc
        self._count(records, result)

    def _count(self, records: Sequence[ConsumerRecord], result: BatchResult) -> None:
        self.metrics.items_processed.labels("ok").inc(len(records) - len(result.rejected))
        self.metrics.items_processed.labels("dead_letter").inc(len(result.rejected))

    def _commit_async(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Send the commit and go on; the answer arrives on the client's network thread."""
        self._uncommitted.update(offsets)

        def answered(sent: dict[TopicPartition, OffsetAndMetadata], response: object) -> None:
            if isinstance(response, Exception):
                # Nothing is lost: the next batch's commit carries these offsets' successors,
                # and a new owner after a rebalance replays from the last committed ones.
                self.metrics.errors.labels("commit_failed").inc()
                log.warning("async offset commit failed", extra={"error": repr(response)})
                return
            for tp, meta in sent.items():
                if self._uncommitted.get(tp) == meta:
                    self._uncommitted.pop(tp, None)

        try:
            self.consumer.commit_async(offsets, callback=answered)
        except KafkaError as exc:
            raise TransientError(f"the offset commit failed: {exc!r}") from exc

    def _isolate(self, records: Sequence[ConsumerRecord]) -> _Isolated:
        """Run the handler; if it raises (not transiently), bisect to the failing records.

        Each half runs in order, so a partition's order is kept; the outputs of all the parts
        are gathered and published once, after the whole batch is through.
        """
        try:
            return _Isolated(self.handler(records), [], len(records))
        except TransientError:
            raise
        except Exception as exc:
            if len(records) == 1:
                return _Isolated(BatchResult(), [(records[0], exc)], 0)
            self.metrics.errors.labels(type(exc).__name__).inc()
        middle = len(records) // 2
        first, second = self._isolate(records[:middle]), self._isolate(records[middle:])
        first.result.extend(second.result)
        return _Isolated(first.result, first.failed + second.failed,
                         first.succeeded + second.succeeded)

    def _retry_later(self, records: list[ConsumerRecord], exc: Exception, kind: str,
                     retry_after_s: float | None) -> None:
        """Seek the batch's partitions back, pause them and resume them after a backoff."""
        self.metrics.errors.labels(type(exc).__name__).inc()
        self.metrics.batch_retries.labels(kind).inc()
        backoff = self._back_off()
        delay = backoff if retry_after_s is None else max(retry_after_s, 0.0)
        log.warning("batch failed; retrying it", exc_info=exc,
                    extra={"records": len(records), "kind": kind, "retry_in_s": delay})
        partitions = self._rewind(records)
        self.consumer.pause(*partitions)
        self.metrics.paused_partitions.set(len(self.consumer.paused()))
        self._resume_at = time.monotonic() + delay

    def _resume_due(self) -> None:
        if self._resume_at and time.monotonic() >= self._resume_at:
            self._resume_at = 0.0
            paused = self.consumer.paused()
            if paused:
                self.consumer.resume(*paused)
            self.metrics.paused_partitions.set(0)

    def _progressed(self) -> None:
        self._backoff = 0.0
        self._failing_since = None

    def _no_progress(self) -> None:
        """Start counting the time without progress (``_report_stall``), unless it already runs."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    def _back_off(self) -> float:
        """A failure: the next retry waits twice as long as the last (from 0.2 s, at most
        ``loop_max_backoff_s``) and counts as no progress. Returns the new delay."""
        self._backoff = min(max(0.2, self._backoff * 2), self.settings.loop.max_backoff_s)
        self._no_progress()
        return self._backoff

    def _report_stall(self) -> None:
        """Publish the no-progress time and flip health when it crosses ``loop_stall_s``."""
        stalled_for = 0.0 if self._failing_since is None else time.monotonic() - self._failing_since
        self.metrics.stalled_seconds.set(stalled_for)
        healthy = self._failing_since is None or stalled_for < self.settings.loop.stall_s
        if healthy != self._healthy:
            self._healthy = healthy
            log.log(logging.INFO if healthy else logging.ERROR,
                    "stream loop progressing again" if healthy else "stream loop stalled",
                    extra={"stalled_s": round(stalled_for, 1)})
            self.on_health(healthy)

    def _rewind(self, records: list[ConsumerRecord]) -> list[TopicPartition]:
        """Seek every assigned partition of the batch back to its first record; return them."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self.consumer.assignment()
        sought = []
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)
                sought.append(tp)
        return sought

    def _check_fetching(self) -> bool:
        """Whether an unpaused partition has had records waiting (position below its high
        watermark), or no fetch answered at all (no high watermark), for ``loop_fetch_stall_s``
        while every poll came back empty.

        kafka-python 3.0 can leave a partition unfetched for good after it was sought back,
        paused and resumed (seen after a Triton restart: lag 212, no fetch for minutes, the loop
        idle). Such a stall counts as no progress (health), and the consumer is closed and made
        again: it rejoins the group and resumes from the committed offsets (at-least-once).
        """
        # No high watermark yet: no fetch of it has been answered since it was assigned (a first
        # answer takes under a second), which is as stuck as records that never come.
        behind = any(position is not None and (high is None or position < high)
                     for high, position in map(self._offsets, self.consumer.assignment()))
        now = time.monotonic()
        if not behind:
            self._behind_since = None
            return False
        if self._behind_since is None:
            self._behind_since = now
        self._no_progress()
        if now - self._behind_since < self.settings.loop.fetch_stall_s:
            return True
        self.metrics.errors.labels("fetch_stalled").inc()
        stalled_s = now - self._behind_since
        self._behind_since = None
        self._remake_consumer(f"records waited {stalled_s:.0f} s but no poll returned them")
        return True

    def _offsets(self, tp: TopicPartition) -> tuple[int | None, int | None]:
        """The partition's high watermark as of the last fetch and this consumer's position
        (None where unknown, not assigned any more, or not known within ``POSITION_TIMEOUT_MS``)."""
        try:
            return self.consumer.highwater(tp), self.consumer.position(tp, timeout_ms=POSITION_TIMEOUT_MS)
        except (KafkaError, IllegalStateError):
            return None, None

    def _update_lag(self) -> None:
        """Lag = high watermark - position, from the fetch responses' high watermarks.

        (tansu answers ListOffsets(LATEST), which ``end_offsets()`` uses, with a wrong offset.)
        Runs on every loop turn, failed batches included, so a stuck partition shows its lag.
        """
        now = time.monotonic()
        if now - self._lag_checked < 2.0:
            return
        self._lag_checked = now
        assigned = set(self.consumer.assignment())
        for lost in self._lag_partitions - assigned:  # moved to another replica
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(lost.topic, str(lost.partition))
        self._lag_partitions = assigned
        for tp in assigned:
            high, position = self._offsets(tp)
            if high is None or position is None:
                continue  # no fetch for this partition yet
            lag = max(0, high - position)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

class GroupLag:
    """How many records of ``topic`` a consumer group has yet to commit: the sum over partitions
    of high watermark minus committed offset (both read from the broker; no group membership).

    The high watermarks come from fetch responses (tansu's ListOffsets(LATEST) is wrong), so a
    measurement seeks to the committed offsets and fetches at most one small batch.
    """

    def __init__(self, settings: Settings, topic: str, group: str,
                 consumer: KafkaConsumer | None = None) -> None:
        self.topic = topic
        self.consumer = consumer or KafkaConsumer(
            bootstrap_servers=list(settings.kafka.bootstrap),
            **kafka_client_options(settings),
            group_id=group, client_id=f"{settings.service}-{settings.server.instance_id}-lag",
            enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=10,
            max_partition_fetch_bytes=1024,
        )
        self._assigned: list[TopicPartition] = []

    def measure(self, timeout_ms: int = 300) -> int | None:
        """The group's lag now, or None when the topic or its high watermarks are unknown."""
        partitions = self.consumer.partitions_for_topic(self.topic)
        if not partitions:
            return None
        wanted = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        if wanted != self._assigned:
            self.consumer.assign(wanted)
            self._assigned = wanted
        committed = {}
        for tp in wanted:
            committed[tp] = self.consumer.committed(tp, timeout_ms=timeout_ms * 5) or 0
            self.consumer.seek(tp, committed[tp])
        self.consumer.poll(timeout_ms=timeout_ms, max_records=1)
        highs = {tp: self.consumer.highwater(tp) for tp in wanted}
        if any(high is None for high in highs.values()):
            return None
        return sum(max(0, (highs[tp] or 0) - committed[tp]) for tp in wanted)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class TopicReader:
    """Reads a topic from the beginning without a consumer group (tools, reports and tests)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=list(settings.kafka.bootstrap),
            **kafka_client_options(settings),
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

    def at_end(self) -> bool:
        """Whether every partition is read up to its high watermark as of the last fetch (tansu's
        ListOffsets(LATEST), which ``end_offsets()`` asks, is wrong; a fetch's watermark is right)."""
        for tp in self.partitions:
            end = self.consumer.highwater(tp)
            if end is None or self.consumer.position(tp) < end:
                return False
        return True

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
