"""Crashes and rebalances mid-stream lose nothing and duplicate nothing.

A stack of its own: the indexing service is SIGKILLed (no chance to commit) while items flow,
then restarted; the embedding service likewise; and a second indexing replica joins and is
killed, forcing two rebalances. Afterwards every accepted item is in Milvus exactly once and
has exactly one decision (a repeated copy on the topic is byte-identical).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack_helpers import read_decisions, start_stack
from twinstream.common.kafka import TopicReader, make_producer
from twinstream.common.vectorstore import VectorStore
from twinstream.demo import febrl_items
from twinstream.devstack import LocalStack
from twinstream.v1 import decisions_pb2, items_pb2

pytestmark = pytest.mark.stack

ITEMS = 450


@pytest.fixture(scope="module")
def crash_stack(base_bundle: Path) -> Iterator[LocalStack]:
    running = start_stack(base_bundle, "recovery", prometheus=False, batch_size=32)
    yield running
    running.stop()


def produce(stack: LocalStack, tenant: str, count: int) -> list[str]:
    """FEBRL3 records onto items.raw (the Kafka ingestion path)."""
    settings = stack.settings()
    producer = make_producer(settings)
    ids = []
    for rec_id, fields in febrl_items(count, seed=hash(tenant) % 1000):
        item = items_pb2.Item(item_id=rec_id, tenant=tenant, collection="crash",
                              modality=items_pb2.RECORD, content=json.dumps(fields).encode())
        producer.send(settings.topics.raw, key=f"{tenant}/crash".encode(),
                      value=item.SerializeToString())
        ids.append(rec_id)
    producer.flush()
    producer.close()
    return ids


def wait_for_decisions(stack: LocalStack, tenant: str, at_least: int, timeout_s: float = 120) -> None:
    settings = stack.settings()
    reader = TopicReader(settings, settings.topics.decisions)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < at_least and time.monotonic() < deadline:
        for record in reader.poll():
            decision = decisions_pb2.Decision.FromString(record.value)
            if decision.tenant == tenant:
                seen.add(decision.item_id)
    reader.close()
    assert len(seen) >= at_least, f"only {len(seen)} decisions before the crash"


def assert_exactly_once(stack: LocalStack, tenant: str, ids: list[str]) -> None:
    decisions = read_decisions(stack, ids, tenant, timeout_s=300)
    for item_id, copies in decisions.items():
        distinct = {c.SerializeToString() for c in copies}
        assert len(distinct) == 1, f"{item_id} got {len(distinct)} different decisions"
    store = VectorStore(stack.milvus_uri)
    rows = store.query(store.alias_name("twinstream_text"), f'tenant == "{tenant}"', ["pk"])
    pks = [r["pk"] for r in rows]
    assert len(pks) == len(set(pks)) == len(ids), "each accepted item is in Milvus exactly once"
    assert {pk.rsplit("/", 1)[1] for pk in pks} == set(ids)


@pytest.mark.parametrize("victim", ["indexing", "embedding"])
def test_sigkill_mid_stream_loses_and_duplicates_nothing(crash_stack: LocalStack, victim: str) -> None:
    tenant = f"crash-{victim}"
    ids = produce(crash_stack, tenant, ITEMS)
    wait_for_decisions(crash_stack, tenant, at_least=60)
    crash_stack.kill_service(victim)
    time.sleep(1.0)
    crash_stack.start_service(victim)
    assert_exactly_once(crash_stack, tenant, ids)


def test_rebalance_to_a_second_indexer_and_back(crash_stack: LocalStack) -> None:
    tenant = "rebalance"
    ids = produce(crash_stack, tenant, ITEMS)
    wait_for_decisions(crash_stack, tenant, at_least=40)
    replica = crash_stack.start_replica("indexing", 2)
    wait_for_decisions(crash_stack, tenant, at_least=200)
    crash_stack.kill_service(replica)
    assert_exactly_once(crash_stack, tenant, ids)
