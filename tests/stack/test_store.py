"""The one writer of a scope's rows, against a real Milvus (Milvus Lite, in-process).

Indexers, the Matching servicer and the reaper run in this process on records built here, so
the races of issue 15 (cases 7 and 8) can be staged step by step: a Delete in the middle of a
cluster merge, and two indexers handling the same batch with one paused before its write.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.commands import is_command, scope_key
from twinstream.common.config import Settings
from twinstream.common.encoding import ItemEncoder
from twinstream.common.kafka import BatchResult, Outgoing
from twinstream.common.vectorstore import QUERY_CAP, VectorStore, row_key
from twinstream.devstack import REPO_ROOT
from twinstream.indexing.reaper import Reaper
from twinstream.indexing.service import Indexer
from twinstream.matching.service import Matching
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import decisions_pb2, items_pb2, matching_pb2

pytestmark = pytest.mark.stack

DIM = 4
TENANT = "acme"
BUNDLE = ModelBundle(
    path=REPO_ROOT / "var" / "models" / "twinstream_text" / "1", name="unit", version="1",
    modalities=("text",), dim=DIM, inputs=("input_ids", "attention_mask"), max_length=16,
    image_size=0, record_fields=(), duplicate_threshold=0.85, match_threshold=0.7,
    ood_threshold=0.5, platt_a=20.0, platt_b=-17.0, preprocessing_digest="d", max_batch_size=8,
)
MODEL = items_pb2.ModelRef(name="unit", version="1")


class NoEncoder:
    """Delete never encodes; the servicer only needs the bundle."""

    backend = "none"

    def encode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("not used")


class FakeContext:
    """The parts of grpc.ServicerContext the servicer uses."""

    def time_remaining(self) -> float | None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted {code}: {details}")


def context() -> grpc.ServicerContext:
    return cast(grpc.ServicerContext, FakeContext())


def unit(angle_deg: float) -> list[float]:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0], vector[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return vector.tolist()


def embedded(item_id: str, angle: float, ingest_ms: int, content_hash: str = "",
             collection: str = "default") -> items_pb2.EmbeddedItem:
    item = items_pb2.Item(item_id=item_id, tenant=TENANT, collection=collection,
                          modality=items_pb2.TEXT, content=item_id.encode())
    return items_pb2.EmbeddedItem(
        accepted=items_pb2.AcceptedItem(item=item, content_hash=content_hash or f"h-{item_id}",
                                        ingest_time_ms=ingest_ms, source="test"),
        vector=unit(angle), model=MODEL)


def records(messages: Sequence[items_pb2.EmbeddedItem | Outgoing],
            timestamp_ms: int = 0) -> list[ConsumerRecord]:
    """Consumer records as indexing would poll them from items.embedded."""
    out = []
    for offset, message in enumerate(messages):
        if isinstance(message, Outgoing):
            key, value, headers = message.key, message.value, list(message.headers)
        else:
            it = message.accepted.item
            key, value, headers = scope_key(it.tenant, it.collection), message.SerializeToString(), []
        out.append(ConsumerRecord("items.embedded", 0, 0, offset, timestamp_ms or int(time.time() * 1000),
                                  0, key, value, headers, None, len(key), len(value), -1))
    return out


def decisions(result: BatchResult) -> dict[str, decisions_pb2.Decision]:
    return {d.item_id: d for d in (decisions_pb2.Decision.FromString(o.value)
                                   for o in result.outputs)}


@pytest.fixture
def store(tmp_path: Path) -> VectorStore:
    return VectorStore(str(tmp_path / "milvus.db"), prefix="unit")


@pytest.fixture
def settings() -> Settings:
    return Settings(service="indexing", milvus={"flush_rows": 0}, search={"neighbours": 5},
                    retention={"delete_wait_s": 0.0, "collection_ttls": "*/ephemeral=60",
                               "tombstone_retention_s": 3600})


@pytest.fixture
def sent() -> list[Outgoing]:
    return []


@pytest.fixture
def matching(settings: Settings, store: VectorStore, sent: list[Outgoing]) -> Matching:
    return Matching(settings, store, [ItemEncoder(BUNDLE, NoEncoder())], sent.extend)


def live_row(store: VectorStore, item_id: str, collection: str = "default") -> dict[str, Any]:
    name = store.collection_name(MODEL)
    return store.get(name, [row_key(TENANT, collection, item_id)],
                     ["pk", "cluster_id", "deleted_ms"])[row_key(TENANT, collection, item_id)]


def test_a_cluster_merge_cannot_revive_an_item_deleted_while_it_ran(
        settings: Settings, store: VectorStore, matching: Matching, sent: list[Outgoing],
        monkeypatch: pytest.MonkeyPatch) -> None:
    indexer = Indexer(settings, store, [BUNDLE])
    now = int(time.time() * 1000)
    indexer(records([embedded("A", 0, now), embedded("B", 60, now + 1)]))
    # C links A and B (cosine 0.87 to each): the merge reads B's row, then a Delete of B comes
    # in, then the merge writes B's row back into cluster A.
    original_query = store.query

    def query_then_delete(collection: str, expr: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        rows = original_query(collection, expr, *args, **kwargs)
        if "cluster_id in" in expr and any(r.get("item_id") == "B" and "vector" in r for r in rows):
            response = matching.Delete(matching_pb2.DeleteRequest(tenant=TENANT, item_ids=["B"]),
                                       context())
            assert response.deleted == 1 and response.pending, "applied later, by indexing"
        return rows

    with monkeypatch.context() as patch:
        patch.setattr(store, "query", query_then_delete)
        merged = decisions(indexer(records([embedded("C", 30, now + 2)])))["C"]
    assert list(merged.merged_clusters) == ["B"], "the merge ran"
    assert [is_command(r) for r in records(sent)] == [True], "Delete only published a command"
    indexer(records(sent))  # indexing applies it after the merge, in log order
    assert live_row(store, "B")["deleted_ms"] > 0, "the deleted item stays deleted"
    assert live_row(store, "A")["deleted_ms"] == 0


def test_delete_waits_until_indexing_applied_it(settings: Settings, store: VectorStore,
                                                sent: list[Outgoing]) -> None:
    indexer = Indexer(settings, store, [BUNDLE])
    indexer(records([embedded("x", 0, 1), embedded("y", 90, 2)]))

    def apply_now(messages: Sequence[Outgoing]) -> None:
        sent.extend(messages)
        indexer(records(messages))

    waiting = Matching(Settings(retention={"delete_wait_s": 5.0}), store, [ItemEncoder(BUNDLE, NoEncoder())],
                       apply_now)
    response = waiting.Delete(matching_pb2.DeleteRequest(tenant=TENANT, item_ids=["x", "nope"]),
                              context())
    assert (response.deleted, response.pending) == (1, False)
    assert live_row(store, "x")["deleted_ms"] > 0 and live_row(store, "y")["deleted_ms"] == 0
    again = waiting.Delete(matching_pb2.DeleteRequest(tenant=TENANT, item_ids=["x"]),
                           context())
    assert (again.deleted, again.pending) == (0, False) and len(sent) == 1, "nothing left to do"


def run_paused_before_write(indexer: Indexer, batch: list[ConsumerRecord], paused: threading.Event,
                            release: threading.Event,
                            monkeypatch: pytest.MonkeyPatch) -> Callable[[], BatchResult]:
    """Run ``indexer`` on ``batch`` in a thread that stops right before its upsert."""
    original = indexer.store.upsert
    result: list[BatchResult] = []

    def upsert(collection: str, rows: Sequence[dict[str, Any]]) -> None:
        paused.set()
        release.wait(30)
        original(collection, rows)

    monkeypatch.setattr(indexer.store, "upsert", upsert)
    thread = threading.Thread(target=lambda: result.append(indexer(batch)))
    thread.start()

    def finish() -> BatchResult:
        thread.join(30)
        return result[0]

    return finish


def test_two_indexers_on_the_same_batch_publish_byte_identical_decisions(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path / "milvus.db")
    now = int(time.time() * 1000)
    batch = records([embedded("p", 0, now), embedded("q", 20, now + 1), embedded("r", 80, now + 2)],
                    timestamp_ms=now + 5)
    zombie = Indexer(settings, VectorStore(uri, prefix="unit"), [BUNDLE])
    paused, release = threading.Event(), threading.Event()
    finish_zombie = run_paused_before_write(zombie, batch, paused, release, monkeypatch)
    assert paused.wait(30), "the zombie decided and stopped before its write"
    time.sleep(0.01)  # the clock moves on while it is paused
    successor = Indexer(settings, VectorStore(uri, prefix="unit"), [BUNDLE])
    fresh = successor(batch)
    release.set()
    stale = finish_zombie()
    assert [o.value for o in stale.outputs] == [o.value for o in fresh.outputs]
    assert decisions(fresh)["q"].kind == decisions_pb2.NEAR_DUPLICATE
    assert decisions(fresh)["q"].decided_time_ms == now + 5, "the embedded record's time"


def test_a_zombie_resuming_after_its_successor_moved_on_does_not_overwrite_rows(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = str(tmp_path / "milvus.db")
    now = int(time.time() * 1000)
    batch = records([embedded("u", 0, now), embedded("v", 20, now + 1)], timestamp_ms=now + 5)
    zombie_store = VectorStore(uri, prefix="unit")
    zombie = Indexer(settings, zombie_store, [BUNDLE])
    paused, release = threading.Event(), threading.Event()
    original_get = zombie_store.get
    calls: list[int] = []

    def get(collection: str, pks: Sequence[str], *args: Any) -> dict[str, dict[str, Any]]:
        calls.append(1)
        if len(calls) == 2:  # decided; about to write
            paused.set()
            release.wait(30)
        return original_get(collection, pks, *args)

    monkeypatch.setattr(zombie_store, "get", get)
    thread_result: list[BatchResult] = []
    thread = threading.Thread(target=lambda: thread_result.append(zombie(batch)))
    thread.start()
    assert paused.wait(30)
    successor = Indexer(settings, VectorStore(uri, prefix="unit"), [BUNDLE])
    fresh = successor(batch)
    sent: list[Outgoing] = []
    Matching(settings, successor.store, [ItemEncoder(BUNDLE, NoEncoder())], sent.extend).Delete(
        matching_pb2.DeleteRequest(tenant=TENANT, item_ids=["v"]), context())
    successor(records(sent))  # the successor went on: v is deleted
    release.set()
    thread.join(30)
    assert [o.value for o in thread_result[0].outputs] == [o.value for o in fresh.outputs]
    assert live_row(successor.store, "v")["deleted_ms"] > 0, "the zombie did not revive v"


def test_a_stored_id_with_other_content_is_dead_lettered_as_id_conflict(
        settings: Settings, store: VectorStore) -> None:
    indexer = Indexer(settings, store, [BUNDLE])
    now = int(time.time() * 1000)
    first = indexer(records([embedded("k", 0, now, content_hash="one")]))
    # what a second ingestion replica would publish: the same id, accepted again, other content
    result = indexer(records([embedded("k", 45, now + 9, content_hash="two"),
                              embedded("k", 0, now, content_hash="one")]))
    assert [(r.reason, r.item_id) for r in result.rejected] == [("id_conflict", "k")]
    assert "ids are idempotency keys" in result.rejected[0].detail
    assert [o.value for o in result.outputs] == [o.value for o in first.outputs], (
        "the stored item's decision is repeated unchanged")
    same_batch = indexer(records([embedded("m", 0, now, content_hash="a"),
                                  embedded("m", 45, now, content_hash="b")]))
    assert [r.reason for r in same_batch.rejected] == ["id_conflict"]
    assert list(decisions(same_batch)) == ["m"]


def test_the_reaper_only_reads_and_indexing_applies_expiry_and_purge(
        settings: Settings, store: VectorStore) -> None:
    indexer = Indexer(settings, store, [BUNDLE])
    now = int(time.time() * 1000)
    old, recent = now - 120_000, now - 1_000
    indexer(records([embedded("old", 0, old, collection="ephemeral"),
                     embedded("new", 90, recent, collection="ephemeral"),
                     embedded("kept", 45, old)]))
    sent: list[Outgoing] = []
    reaper = Reaper(settings, store, sent.extend)
    assert reaper.run_once(now) == (1, 0)
    assert live_row(store, "old", "ephemeral")["deleted_ms"] == 0, "the reaper wrote nothing"
    indexer(records(sent))
    assert live_row(store, "old", "ephemeral")["deleted_ms"] == now
    assert live_row(store, "new", "ephemeral")["deleted_ms"] == 0
    assert live_row(store, "kept")["deleted_ms"] == 0, "no TTL in that collection"
    sent.clear()
    later = now + 3600 * 1000 + 1
    assert reaper.run_once(later) == (1, 1)  # "new" expired by now; "old" past retention
    indexer(records(sent))
    name = store.collection_name(MODEL)
    assert row_key(TENANT, "ephemeral", "old") not in store.get(name, [row_key(TENANT, "ephemeral", "old")])


def test_scans_return_every_row_past_the_query_cap(store: VectorStore) -> None:
    name = store.ensure_collection(MODEL, DIM)
    total = QUERY_CAP + 25
    rows = [{"pk": f"{TENANT}/default/{i}", "item_id": str(i), "tenant": TENANT,
             "collection": "default", "content_hash": "h", "cluster_id": "c", "ingest_ms": i,
             "event_ms": 0, "metadata": {}, "decision": "", "deleted_ms": 0, "vector": unit(i % 90)}
            for i in range(total)]
    for start in range(0, total, 5000):
        store.upsert(name, rows[start:start + 5000])
    found = store.query(name, f'tenant == "{TENANT}"', ["pk"])
    assert len(found) == len({r["pk"] for r in found}) == total


def test_a_bounded_query_reads_at_most_its_limit(store: VectorStore) -> None:
    name = store.ensure_collection(MODEL, DIM)
    rows = [{"pk": f"{TENANT}/default/{i}", "item_id": str(i), "tenant": TENANT,
             "collection": "default", "content_hash": "h", "cluster_id": "c", "ingest_ms": i,
             "event_ms": 0, "metadata": {}, "decision": "", "deleted_ms": 0, "vector": unit(i % 90)}
            for i in range(50)]
    store.upsert(name, rows)
    assert len(store.query(name, f'tenant == "{TENANT}"', ["pk"], limit=7)) == 7
    assert len(store.query(name, f'tenant == "{TENANT}"', ["pk"])) == 50


def test_reads_load_a_collection_milvus_released(store: VectorStore) -> None:
    indexer = Indexer(Settings(milvus={"flush_rows": 0}), store, [BUNDLE])
    indexer(records([embedded("a", 0, 1)]))
    name = store.collection_name(MODEL)
    for read in (lambda: store.get(name, [row_key(TENANT, "default", "a")]),
                 lambda: store.query(name, f'tenant == "{TENANT}"', ["pk"]),
                 lambda: store.search(name, [unit(0)], 1, f'tenant == "{TENANT}"')[0]):
        store.client.release_collection(name)  # what a Milvus restart leaves behind
        assert len(read()) == 1
