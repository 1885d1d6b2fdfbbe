"""An idle stream loop against a bare tansu broker (in memory): each empty fetch answer is a loop
turn in Python and a storage read on the S3-backed broker, so how long the broker may hold an
empty fetch (``TWINSTREAM_KAFKA_FETCH_MAX_WAIT_MS``) sets the idle cost of every stage
(docs/bench/throughput.md, 2026-11-29). tansu answers a held fetch when a record arrives."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.config import KafkaSettings, Settings
from twinstream.common.kafka import BatchResult, ConsumeLoop
from twinstream.devstack import ManagedProcess, free_port, tansu_binary

TOPIC = "fetch.wait"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = ManagedProcess("broker", [str(tansu_binary()), "broker", "--listener-url", url,
                                        "--advertised-listener-url", url,
                                        "--storage-engine", "memory://tansu/"],
                             {}, Path(tmp_path_factory.mktemp("tansu")) / "broker.log")
    process.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(process.log_tail()) from None
                time.sleep(0.1)
        bootstrap = f"127.0.0.1:{port}"
        admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
        admin.create_topics([NewTopic(TOPIC, 2, 1)])
        admin.close()
        yield bootstrap
    finally:
        process.stop(5)


def count_fetches(loop: ConsumeLoop) -> list[int]:
    """A counter of the fetch requests the loop's consumer builds (kafka-python's fetcher, pinned:
    it has no public count of requests)."""
    sent = [0]
    fetcher: Any = loop.consumer._fetcher
    create = fetcher._create_fetch_requests

    def counted() -> Any:
        requests = create()
        sent[0] += len(requests)
        return requests

    fetcher._create_fetch_requests = counted
    return sent


def test_an_idle_stream_loop_sends_few_empty_fetches_and_still_gets_each_record(broker: str) -> None:
    """At the old 50 ms wait an idle loop sent 8-17 fetches a second (each answered empty, each a
    loop turn); at the default 250 ms ~2-4. A record produced to the idle loop is still handled."""
    settings = Settings(service="test", kafka=KafkaSettings(bootstrap=(broker,), consumer_group="fetch-wait"))
    seen: list[bytes] = []
    got = threading.Event()

    def handler(records: Sequence[ConsumerRecord]) -> BatchResult:
        seen.extend(r.value for r in records)
        got.set()
        return BatchResult()

    ready = threading.Event()
    stopping = threading.Event()
    loop = ConsumeLoop(settings, TOPIC, handler)
    sent = count_fetches(loop)
    thread = threading.Thread(target=loop.run, args=(stopping, ready.set), daemon=True)
    thread.start()
    producer = KafkaProducer(bootstrap_servers=[broker])
    try:
        assert ready.wait(60), "the loop never joined its group"
        time.sleep(1.0)  # the first fetches after the join
        before, started = sent[0], time.monotonic()
        time.sleep(3.0)
        per_second = (sent[0] - before) / (time.monotonic() - started)
        producer.send(TOPIC, key=b"k", value=b"late").get(timeout=10)
        assert got.wait(30), "the idle loop never handled the record"
    finally:
        producer.close()
        stopping.set()
        thread.join(30)
    assert seen == [b"late"]
    assert per_second <= 4.5, f"{per_second:.1f} empty fetches a second"
