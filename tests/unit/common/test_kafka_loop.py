"""ConsumeLoop's failure handling, driven by an in-memory consumer and producer (a unit test of
one class: the live-stack tests in tests/stack/test_stream_faults.py prove the same end to end)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, UnknownError

from twinstream.common.config import Settings
from twinstream.common.errors import PermanentError, TransientError
from twinstream.common.kafka import (
    MAX_REQUEST_BYTES,
    BatchResult,
    ConsumeLoop,
    Outgoing,
    Producer,
    Rejected,
    dead_letter,
    publish,
)
from twinstream.v1 import items_pb2
from unit.fake_kafka import FakeFuture, FakeProducer

TOPIC = "items.test"


def record(partition: int, offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, partition, -1, offset, 0, 0, b"k", value, [], None, len(b"k"),
                          len(value), -1)


def bounded(timeout_ms: int | None) -> None:
    """kafka-python 3.0's commit() and position() wait without end when given no timeout (while
    the coordinator is away): the loop's thread must always bound them."""
    if timeout_ms is None:
        raise AssertionError("a consumer call without a timeout can hang the loop's thread")


@dataclass
class FakeConsumer:
    """Partition logs with positions, pause/resume, seek and commit, as KafkaConsumer does."""

    logs: dict[int, list[bytes]]
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    paused_set: set[TopicPartition] = field(default_factory=set)
    pause_calls: int = 0

    def __post_init__(self) -> None:
        self.positions = {TopicPartition(TOPIC, p): 0 for p in self.logs}

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[TopicPartition, list[Any]]:
        out: dict[TopicPartition, list[Any]] = {}
        for tp, position in self.positions.items():
            if tp in self.paused_set or max_records <= 0:
                continue
            values = self.logs[tp.partition][position:position + max_records]
            if values:
                out[tp] = [record(tp.partition, position + i, v) for i, v in enumerate(values)]
                self.positions[tp] = position + len(values)
                max_records -= len(values)
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.pause_calls += 1
        self.paused_set.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_set.difference_update(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_set)

    # What happened, in order: "flush" (from a FakeProducer sharing it), "commit", "commit_async".
    events: list[str] = field(default_factory=list)
    async_commit_error: Exception | None = None

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        bounded(timeout_ms)
        self.events.append("commit")
        for tp, meta in offsets.items():
            self.committed[tp] = meta.offset

    def commit_async(self, offsets: dict[TopicPartition, Any],
                     callback: Callable[[dict[TopicPartition, Any], Any], None]) -> None:
        """Answers at once: the offsets committed, or ``async_commit_error`` to the callback."""
        self.events.append("commit_async")
        if self.async_commit_error is not None:
            callback(offsets, self.async_commit_error)
            return
        for tp, meta in offsets.items():
            self.committed[tp] = meta.offset
        callback(offsets, None)

    def highwater(self, tp: TopicPartition) -> int | None:
        return len(self.logs[tp.partition])

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        bounded(timeout_ms)
        return self.positions[tp]

    def close(self, autocommit: bool = False) -> None:
        pass


Handler = Callable[[Sequence[ConsumerRecord]], BatchResult]
MakeLoop = Callable[..., tuple[ConsumeLoop, FakeConsumer, FakeProducer]]


@pytest.fixture
def settings() -> Settings:
    return Settings(service="looptest", loop={"batch_size": 8, "stall_s": 3600})


@pytest.fixture
def make_loop(settings: Settings) -> MakeLoop:
    def make(handler: Any, logs: dict[int, list[bytes]], **overrides: Any
             ) -> tuple[ConsumeLoop, FakeConsumer, FakeProducer]:
        consumer = FakeConsumer(logs)
        producer = FakeProducer(events=consumer.events)
        loop = ConsumeLoop(settings.replace(**overrides), TOPIC, handler,
                           producer=Producer(lambda: producer), consumer=consumer)
        return loop, consumer, producer
    return make


def echo_unless(poison: Callable[[bytes], Exception | None]) -> Handler:
    """Echoes every record to items.out; raises ``poison(value)`` for the first bad one."""
    def handle(records: Sequence[ConsumerRecord]) -> BatchResult:
        for r in records:
            error = poison(r.value)
            if error is not None:
                raise error
        return BatchResult(outputs=[Outgoing("items.out", r.key, r.value) for r in records])
    return handle


def drive(loop: ConsumeLoop, turns: int = 20) -> None:
    """Run the loop's turns by hand (no thread): resume what is due, poll, step."""
    for _ in range(turns):
        loop._resume_at = min(loop._resume_at, 1e-9) if loop._resume_at else 0.0  # no waiting
        loop._resume_due()
        records = sorted((r for batch in loop.consumer.poll(max_records=8).values() for r in batch),
                         key=lambda r: (r.partition, r.offset))
        if records:
            loop.step(records)
        loop._update_lag()
        loop._report_stall()


def letters(producer: FakeProducer, settings: Settings) -> list[items_pb2.DeadLetter]:
    return [items_pb2.DeadLetter.FromString(v) for v in producer.on(settings.topics.dlq)]


def metric(loop: ConsumeLoop, name: str, **labels: str) -> float:
    """A sample of the loop's own metrics (each loop counts on a fresh registry here)."""
    return loop.metrics.registry.get_sample_value(name, labels) or 0.0


def test_unknown_error_isolates_the_poison_record_and_the_rest_proceed(make_loop: MakeLoop, settings: Settings) -> None:
    values = [f"ok{i}".encode() for i in range(8)]
    values[5] = b"poison"
    loop, consumer, producer = make_loop(
        echo_unless(lambda v: RecursionError("too deep") if v == b"poison" else None), {0: values})
    drive(loop, 2)
    good = [v for v in values if v != b"poison"]
    assert producer.on("items.out") == good, "each good output once, in order"
    [letter] = letters(producer, settings)
    assert (letter.reason, letter.source_offset, letter.payload) == ("handler_error", 5, b"poison")
    assert "RecursionError: too deep" in letter.detail
    assert consumer.committed[TopicPartition(TOPIC, 0)] == 8


def test_permanent_error_is_dead_lettered_with_its_reason(make_loop: MakeLoop, settings: Settings) -> None:
    values = [b"a", b"bad", b"c"]
    loop, _consumer, producer = make_loop(
        echo_unless(lambda v: PermanentError("unterminated", "no") if v == b"bad" else None),
        {0: values})
    drive(loop, 2)
    assert producer.on("items.out") == [b"a", b"c"]
    assert [(x.reason, x.detail) for x in letters(producer, settings)] == [("unterminated", "no")]


def test_transient_error_pauses_seeks_back_and_retries_without_duplicates(make_loop: MakeLoop) -> None:
    failures = iter([TransientError("Milvus down"), TransientError("Milvus down", 0.0)])
    values = [b"a", b"b", b"c"]
    loop, consumer, producer = make_loop(echo_unless(lambda v: next(failures, None)), {0: values, 1: []})
    drive(loop, 1)
    assert consumer.paused() == {TopicPartition(TOPIC, 0)}, "the failed batch's partition waits"
    assert consumer.positions[TopicPartition(TOPIC, 0)] == 0, "sought back to the batch start"
    assert metric(loop, "twinstream_stream_paused_partitions") == 1
    drive(loop, 4)
    assert producer.on("items.out") == values, "published once, after the retries"
    assert metric(loop, "twinstream_stream_batch_retries_total", kind="transient") == 2
    assert not consumer.paused() and consumer.committed[TopicPartition(TOPIC, 0)] == 3


def test_a_batch_that_fails_entirely_unclassified_is_retried_not_dead_lettered(
        make_loop: MakeLoop, settings: Settings) -> None:
    """An outage nobody classified must not send a batch of good records to the DLQ."""
    down = {"on": True}
    loop, _consumer, producer = make_loop(
        echo_unless(lambda v: RuntimeError("socket closed") if down["on"] else None),
        {0: [b"a", b"b"]})
    drive(loop, 3)
    assert not letters(producer, settings) and not producer.on("items.out")
    down["on"] = False
    drive(loop, 2)
    assert producer.on("items.out") == [b"a", b"b"] and not letters(producer, settings)


def test_a_lone_poison_record_is_isolated_once_another_record_joins_it(make_loop: MakeLoop, settings: Settings) -> None:
    logs = {0: [b"poison"]}
    loop, _consumer, producer = make_loop(
        echo_unless(lambda v: KeyError("boom") if v == b"poison" else None), logs)
    drive(loop, 2)
    assert not letters(producer, settings)
    logs[0].append(b"next")
    drive(loop, 2)
    assert [x.source_offset for x in letters(producer, settings)] == [0]
    assert producer.on("items.out") == [b"next"]


def test_other_partitions_proceed_while_one_waits_for_its_retry(make_loop: MakeLoop) -> None:
    def fail_p0(records: Sequence[ConsumerRecord]) -> BatchResult:
        if any(r.partition == 0 for r in records):
            raise TransientError("down for partition 0")
        return BatchResult(outputs=[Outgoing("items.out", r.key, r.value) for r in records])
    loop, consumer, producer = make_loop(fail_p0, {0: [b"a"], 1: []})
    drive(loop, 1)  # partition 0's batch fails
    loop._resume_at = 1e12  # and stays paused
    consumer.logs[1].append(b"b")
    records = sorted((r for batch in consumer.poll(max_records=8).values() for r in batch),
                     key=lambda r: r.partition)
    assert [r.partition for r in records] == [1]
    loop.step(records)
    assert producer.on("items.out") == [b"b"]


def test_a_stalled_loop_turns_unhealthy_and_recovers(make_loop: MakeLoop) -> None:
    state = {"down": True}
    health: list[bool] = []
    loop, _consumer, _producer = make_loop(
        echo_unless(lambda v: TransientError("Triton down") if state["down"] else None),
        {0: [b"a"]}, loop={"stall_s": 0.0})
    loop.on_health = health.append
    drive(loop, 2)
    assert health == [False]
    assert metric(loop, "twinstream_stream_stalled_seconds") > 0
    state["down"] = False
    drive(loop, 2)
    assert health == [False, True]
    assert metric(loop, "twinstream_stream_stalled_seconds") == 0


def test_lag_comes_from_the_high_watermark_and_updates_while_a_batch_is_retried(make_loop: MakeLoop) -> None:
    loop, consumer, _producer = make_loop(
        echo_unless(lambda v: TransientError("down")), {0: [b"x"] * 5})
    drive(loop, 1)
    loop._lag_checked = 0.0
    loop._update_lag()
    assert metric(loop, "twinstream_stream_consumer_lag_records", topic=TOPIC, partition="0") == 5
    consumer.logs[0].extend([b"y"] * 3)  # more arrive while the batch keeps failing
    loop._lag_checked = 0.0
    drive(loop, 1)
    assert metric(loop, "twinstream_stream_consumer_lag_records", topic=TOPIC, partition="0") == 8


def test_a_dead_letter_of_a_huge_record_fits_the_producer_request_limit(settings: Settings) -> None:
    huge = record(0, 7, b"x" * (9 * 1024 * 1024))
    letter_bytes = dead_letter(settings, Rejected(huge, "too_large", "over the limit")).value
    assert len(letter_bytes) < MAX_REQUEST_BYTES
    letter = items_pb2.DeadLetter.FromString(letter_bytes)
    assert len(letter.payload) == settings.loop.dead_letter_max_bytes
    assert f"payload truncated: {9 * 1024 * 1024} bytes" in letter.detail
    small = dead_letter(settings, Rejected(record(0, 8, b"tiny"), "r", "d")).value
    assert items_pb2.DeadLetter.FromString(small).payload == b"tiny", "small payloads untouched"


def test_a_broker_that_does_not_acknowledge_is_a_transient_error() -> None:
    producer = FakeProducer(fail_with=KafkaTimeoutError("no ack"))
    with pytest.raises(TransientError, match="did not acknowledge"):
        publish(Producer(lambda: producer), [Outgoing("t", b"k", b"v")])


def test_a_non_retriable_broker_error_rebuilds_the_producer_before_the_retry() -> None:
    # UnknownError is what tansu answers while its S3 storage is down; kafka-python does not
    # retry it, and the batch's retry must not run on a producer left in that state.
    built = [FakeProducer(fail_with=UnknownError()), FakeProducer()]
    producer = Producer(lambda: built.pop(0))
    with pytest.raises(TransientError):
        publish(producer, [Outgoing("t", b"k", b"v")])
    publish(producer, [Outgoing("t", b"k", b"v")])
    assert not built, "a second producer was built"
    assert producer.current.on("t") == [b"v"], "the retry went out on the fresh producer"


def test_offsets_are_committed_only_after_the_outputs_are_acknowledged_and_after_flush_ran(
        settings: Settings) -> None:
    consumer = FakeConsumer({0: [b"a", b"b"]})
    events = consumer.events

    class RecordingProducer(FakeProducer):
        def send(self, topic: str, key: bytes, value: bytes,
                 headers: list[tuple[str, bytes]] | None = None) -> FakeFuture:
            events.append("send")
            return super().send(topic, key, value, headers)

    def handle(records: Sequence[ConsumerRecord]) -> BatchResult:
        return BatchResult(outputs=[Outgoing("items.out", r.key, r.value) for r in records],
                           after_flush=lambda: events.append("after_flush"))

    producer = Producer(lambda: RecordingProducer(events=events))  # type: ignore[arg-type, return-value]
    drive(ConsumeLoop(settings, TOPIC, handle, producer=producer, consumer=consumer), 1)
    assert events == ["send", "send", "flush", "after_flush", "commit_async"]
    assert consumer.committed[TopicPartition(TOPIC, 0)] == 2


def test_a_batch_whose_outputs_are_not_acknowledged_is_not_committed(make_loop: MakeLoop) -> None:
    loop, consumer, producer = make_loop(echo_unless(lambda v: None), {0: [b"a", b"b"]})
    producer.fail_with = KafkaTimeoutError("no ack")
    drive(loop, 1)
    assert consumer.committed == {} and consumer.positions[TopicPartition(TOPIC, 0)] == 0, \
        "not committed, and sought back for a retry"
    producer.fail_with = None
    drive(loop, 3)
    assert producer.on("items.out") == [b"a", b"b"] and consumer.committed[TopicPartition(TOPIC, 0)] == 2


def test_offsets_are_committed_without_waiting_and_only_after_the_outputs_are_flushed(
        make_loop: MakeLoop) -> None:
    loop, consumer, producer = make_loop(echo_unless(lambda v: None), {0: [b"a", b"b"], 1: [b"c"]})
    drive(loop, turns=1)
    assert consumer.events == ["flush", "commit_async"]
    assert consumer.committed == {TopicPartition(TOPIC, 0): 2, TopicPartition(TOPIC, 1): 1}
    assert producer.on("items.out") == [b"a", b"b", b"c"]


def test_a_synchronous_commit_remains_available(make_loop: MakeLoop) -> None:
    loop, consumer, _ = make_loop(echo_unless(lambda v: None), {0: [b"a"]}, kafka={"async_commit": False})
    drive(loop, turns=1)
    assert consumer.events == ["flush", "commit"]


def test_a_failed_async_commit_is_counted_and_repeated_when_the_loop_closes(
        make_loop: MakeLoop) -> None:
    loop, consumer, _ = make_loop(echo_unless(lambda v: None), {0: [b"a", b"b"]})
    consumer.async_commit_error = KafkaTimeoutError("coordinator gone")
    before = metric(loop, "twinstream_errors_total", reason="commit_failed")
    drive(loop, turns=1)
    assert consumer.committed == {}
    assert metric(loop, "twinstream_errors_total", reason="commit_failed") == before + 1
    loop.close()
    assert consumer.committed == {TopicPartition(TOPIC, 0): 2}
    assert consumer.events[-1] == "commit"


def test_a_rebalance_forgets_unanswered_commits_and_tells_the_handler(make_loop: MakeLoop) -> None:
    loop, consumer, _ = make_loop(echo_unless(lambda v: None), {0: [b"a"]})
    consumer.async_commit_error = KafkaTimeoutError("coordinator gone")
    calls: list[str] = []
    loop._on_rebalance = lambda: calls.append("rebalanced")
    drive(loop, turns=1)
    loop._rebalanced()  # what the consumer's listener calls when partitions move
    loop.close()
    assert calls == ["rebalanced"]
    assert consumer.committed == {}  # partition 0 may be another member's now



def test_a_retriable_broker_error_keeps_the_producer() -> None:
    builds: list[FakeProducer] = []

    def build() -> FakeProducer:
        builds.append(FakeProducer(fail_with=KafkaTimeoutError("no ack")))
        return builds[-1]

    with pytest.raises(TransientError):
        publish(Producer(build), [Outgoing("t", b"k", b"v")])
    assert len(builds) == 1


class StuckConsumer(FakeConsumer):
    """Knows records wait (its high watermark is ahead) but no poll returns them: what
    kafka-python 3.0 did to a partition sought back, paused and resumed after a Triton restart."""

    closed = False

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[TopicPartition, list[Any]]:
        return {}

    def close(self, autocommit: bool = False) -> None:
        self.closed = True


class UnfetchedConsumer(StuckConsumer):
    """Assigned, with a position, but no fetch of it ever answered (no high watermark)."""

    def highwater(self, tp: TopicPartition) -> int | None:
        return None


@pytest.mark.parametrize("stuck_kind, why", [
    (StuckConsumer, "waiting records that never come are no progress"),
    (UnfetchedConsumer, "a partition no fetch has answered for is no progress"),
])
def test_a_consumer_that_never_fetches_what_waits_is_made_again(settings: Settings, stuck_kind: type[StuckConsumer],
                                                                 why: str) -> None:
    stuck = stuck_kind({0: [b"a", b"b"]})
    fresh = FakeConsumer({0: [b"a", b"b"]})
    loop = ConsumeLoop(settings.replace(loop={"fetch_stall_s": 0.0}), TOPIC,
                       echo_unless(lambda v: None), producer=Producer(FakeProducer), consumer=stuck,
                       consumer_factory=lambda: fresh)
    assert loop._poll_batch(threading.Event()) == []
    assert loop._check_fetching(), why
    assert stuck.closed and loop.consumer is fresh
    drive(loop)
    assert fresh.committed == {TopicPartition(TOPIC, 0): 2}, "the new consumer processed them"


def test_a_consumer_at_the_end_of_its_partitions_is_idle_not_stuck(settings: Settings) -> None:
    made: list[FakeConsumer] = []
    consumer = FakeConsumer({0: [b"a"]})
    loop = ConsumeLoop(settings.replace(loop={"fetch_stall_s": 0.0}), TOPIC,
                       echo_unless(lambda v: None), producer=Producer(FakeProducer), consumer=consumer,
                       consumer_factory=lambda: made.append(FakeConsumer({})) or made[-1])
    drive(loop)
    assert not loop._check_fetching()
    assert loop.consumer is consumer and not made


class BrokerGoneConsumer(FakeConsumer):
    """Its polls raise a connection error, as kafka-python 3.0's did when the broker was killed
    while a poll looked up the coordinator or the committed offsets; ``after`` polls succeed first."""

    def __init__(self, logs: dict[int, list[bytes]], failures: int, after: int = 0) -> None:
        super().__init__(logs)
        self.failures, self.after = failures, after
        self.closed = False

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[TopicPartition, list[Any]]:
        if self.after:
            self.after -= 1
            return super().poll(timeout_ms, max_records=1)
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("111 ECONNREFUSED")
        return super().poll(timeout_ms, max_records)

    def close(self, autocommit: bool = False) -> None:
        self.closed = True


def run_until_committed(loop: ConsumeLoop, consumer: Callable[[], FakeConsumer], offset: int,
                        timeout_s: float = 10.0) -> None:
    """Run the loop on its thread until partition 0's committed offset reaches ``offset``."""
    stopping = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stopping,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and consumer().committed.get(TopicPartition(TOPIC, 0)) != offset:
        assert thread.is_alive(), "the loop ended"
        time.sleep(0.01)
    stopping.set()
    thread.join(5)


def test_a_poll_that_raises_a_connection_error_is_retried_not_fatal(settings: Settings) -> None:
    consumer = BrokerGoneConsumer({0: [b"a", b"b"]}, failures=3)
    health: list[bool] = []
    loop = ConsumeLoop(settings.replace(loop={"stall_s": 0.0, "max_backoff_s": 0.01}), TOPIC,
                       echo_unless(lambda v: None), producer=Producer(FakeProducer), consumer=consumer,
                       on_health=health.append)
    run_until_committed(loop, lambda: consumer, 2)
    assert consumer.committed == {TopicPartition(TOPIC, 0): 2}
    assert metric(loop, "twinstream_errors_total", reason="KafkaConnectionError") == 3
    assert health == [False, True], "the failing polls were no progress, then it recovered"


def test_records_polled_before_a_poll_raises_are_processed_not_skipped(settings: Settings) -> None:
    consumer = BrokerGoneConsumer({0: [b"a", b"b", b"c"]}, failures=1, after=1)
    loop = ConsumeLoop(settings.replace(loop={"batch_wait_ms": 1000}), TOPIC, echo_unless(lambda v: None),
                       producer=Producer(FakeProducer), consumer=consumer)
    assert [r.value for r in loop._poll_batch(threading.Event())] == [b"a"]


def test_polls_that_keep_failing_make_the_consumer_again(settings: Settings) -> None:
    gone, fresh = BrokerGoneConsumer({0: [b"a"]}, failures=10**6), FakeConsumer({0: [b"a"]})
    loop = ConsumeLoop(settings.replace(loop={"fetch_stall_s": 0.0, "max_backoff_s": 0.01}), TOPIC,
                       echo_unless(lambda v: None), producer=Producer(FakeProducer), consumer=gone,
                       consumer_factory=lambda: fresh)
    run_until_committed(loop, lambda: fresh, 1)
    assert gone.closed and loop.consumer is fresh
    assert fresh.committed == {TopicPartition(TOPIC, 0): 1}
