"""How fresh the indexer's Milvus reads are (docs/store.md, "Read consistency"), over a real Milvus
Lite: Strong until this indexer wrote the collection since its partitions were assigned, Session
after that (its own writes are then the youngest the scope has), Strong again after a rebalance;
the zombie fence always Strong. Lite answers every level from what it has, so these tests pin the
level each read asks for and that decisions still see the rows written before them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from test_indexer_calibration import DIM
from test_indexer_calibration import message as embedded
from unit.indexing.test_decide import BUNDLE

from twinstream.common.config import Settings
from twinstream.common.vectorstore import VectorStore
from twinstream.indexing.calibration import CollectionState
from twinstream.indexing.calibration_store import CalibrationStore
from twinstream.indexing.service import Indexer
from twinstream.v1 import decisions_pb2, items_pb2

pytestmark = pytest.mark.stack


class ReadLevels:
    """Wraps a MilvusClient and records the consistency level each query and search asks for
    (``None``: the collection's own, Strong)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads: list[tuple[str, str, str | None]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in ("query", "search"):
            return attribute

        def call(collection: str, *args: Any, **kwargs: Any) -> Any:
            self.reads.append((name, collection, kwargs.get("consistency_level")))
            return attribute(collection, *args, **kwargs)
        return call

    def levels(self, collection: str) -> list[str]:
        levels = [level or "Strong" for _, c, level in self.reads if c == collection]
        self.reads.clear()
        return levels


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM)


def message(item_id: str, fields: dict[str, str], seed: int, at: int) -> ConsumerRecord:
    """An embedded record whose content hash is its content's: equal fields, equal hash (an
    exact duplicate under another id)."""
    record = embedded(item_id, fields, vector(seed), at)
    item = items_pb2.EmbeddedItem.FromString(record.value)
    item.accepted.content_hash = "h-" + "-".join(sorted(fields.values()))
    return record._replace(value=item.SerializeToString())


def indexer_on(path: Path, session_reads: bool = True) -> tuple[Indexer, ReadLevels]:
    store = VectorStore(str(path), index_type="FLAT")
    recorder = ReadLevels(store.client)
    store.client = recorder
    settings = Settings(service="indexing", milvus={"uri": str(path)},
                        search={"decide_session_reads": session_reads})
    return Indexer(settings, store, [BUNDLE]), recorder


def decided(indexer: Indexer, messages: list[Any]) -> dict[str, decisions_pb2.Decision]:
    result = indexer(messages)
    assert not result.rejected
    decisions = [decisions_pb2.Decision.FromString(o.value) for o in result.outputs]
    return {d.item_id: d for d in decisions}


@pytest.fixture
def people() -> list[dict[str, str]]:
    return [{"given_name": f"name{i}", "surname": f"family{i}", "postcode": str(2000 + i)}
            for i in range(6)]


def test_reads_are_strong_until_the_indexer_wrote_the_collection_then_session(
        tmp_path: Path, people: list[dict[str, str]]) -> None:
    indexer, recorder = indexer_on(tmp_path / "milvus.db")
    first = [message(f"a{i}", f, i, i) for i, f in enumerate(people[:3])]
    decided(indexer, first)
    collection = indexer.store.collection_name(BUNDLE.model_ref)
    assert set(recorder.levels(collection)) == {"Strong"}

    second = [message(f"b{i}", f, 10 + i, 10 + i) for i, f in enumerate(people[3:])]
    decided(indexer, second)
    levels = recorder.levels(collection)
    assert levels.count("Strong") == 1  # the zombie fence: another client's rows
    assert levels.count("Session") >= 3  # stored decisions, neighbours, exact hashes


def test_a_rebalance_makes_the_next_batch_read_strong_again(
        tmp_path: Path, people: list[dict[str, str]]) -> None:
    indexer, recorder = indexer_on(tmp_path / "milvus.db")
    decided(indexer, [message("a0", people[0], 0, 0)])
    decided(indexer, [message("a1", people[1], 1, 1)])
    collection = indexer.store.collection_name(BUNDLE.model_ref)
    assert "Session" in recorder.levels(collection)
    indexer.on_rebalance()
    decided(indexer, [message("a2", people[2], 2, 2)])
    assert set(recorder.levels(collection)) == {"Strong"}


def test_session_reads_can_be_turned_off(tmp_path: Path, people: list[dict[str, str]]) -> None:
    indexer, recorder = indexer_on(tmp_path / "milvus.db", session_reads=False)
    decided(indexer, [message("a0", people[0], 0, 0)])
    decided(indexer, [message("a1", people[1], 1, 1)])
    assert set(recorder.levels(indexer.store.collection_name(BUNDLE.model_ref))) == {"Strong"}


def test_a_decision_sees_the_previous_batch_and_the_previous_owners_rows(
        tmp_path: Path, people: list[dict[str, str]]) -> None:
    path = tmp_path / "milvus.db"
    owner, _ = indexer_on(path)
    decided(owner, [message("a0", people[0], 0, 0)])
    decided(owner, [message("a1", people[1], 1, 1)])
    # Session by now: the copy of the previous batch's item is found
    again = decided(owner, [message("c1", people[1], 1, 2)])["c1"]
    assert again.kind == decisions_pb2.EXACT_DUPLICATE and again.duplicate_of == "a1"
    owner.store.client.close()
    # the partition moves: a new indexer (another client) sees what the previous owner wrote
    successor, _ = indexer_on(path)
    later = decided(successor, [message("c0", people[0], 0, 3)])["c0"]
    assert later.kind == decisions_pb2.EXACT_DUPLICATE and later.duplicate_of == "a0"


def test_the_calibration_state_is_read_from_milvus_again_only_after_a_rebalance(tmp_path: Path) -> None:
    path = str(tmp_path / "milvus.db")
    store = VectorStore(path, index_type="FLAT")
    writer, reader = CalibrationStore(store), CalibrationStore(store)
    writer.save("k", CollectionState(items=5))
    assert reader.load("k").items == 5
    writer.save("k", CollectionState(items=9))  # (only a previous owner writes while we own it)
    assert reader.load("k").items == 5  # cached: no Milvus read per batch
    reader.forget()
    assert reader.load("k").items == 9


def test_cached_calibration_and_session_reads_decide_exactly_as_strong_reads_every_batch(
        tmp_path: Path) -> None:
    from test_indexer_calibration import records

    messages = [embedded(i, f, v, n) for n, (i, _, f, v) in enumerate(records(90))]

    def run(path: Path, fresh_reads: bool) -> list[bytes]:
        indexer, _ = indexer_on(path, session_reads=not fresh_reads)
        out = []
        for start in range(0, len(messages), 16):
            if fresh_reads:
                indexer.calibrations.forget()  # read the state back from Milvus every batch
            out += [o.value for o in indexer(messages[start:start + 16]).outputs]
        return out

    cached, fresh = run(tmp_path / "a.db", False), run(tmp_path / "b.db", True)
    assert len(cached) == len(messages)
    assert cached == fresh
