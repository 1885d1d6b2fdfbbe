"""Factories for the indexer's unit tests: embedded items, their records, an in-memory store.

``FakeStore`` keeps rows in dicts and evaluates the Milvus filters the indexer writes
(``tenant == "t" and deleted_ms == 0 and cluster_id in ["a"]``), which are Python expressions
too; search is exact cosine. It stands in for ``VectorStore`` in tests of one class (the
apply step); the same flows against a real Milvus are tests/stack/test_store.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.commands import HEADER, STORE_COMMAND, scope_key
from twinstream.common.config import Settings
from twinstream.common.vectorstore import Hit, VectorStore, row_key
from twinstream.indexing.calibration import CollectionState
from twinstream.indexing.calibration_store import CalibrationStore
from twinstream.indexing.plan import Pending
from twinstream.indexing.service import Indexer
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import items_pb2

DIM = 4
TENANT = "acme"
SCOPE = f'tenant == "{TENANT}" and collection == "default" and deleted_ms == 0'
BUNDLE = ModelBundle(
    path=Path("."), name="unit", version="1", modalities=("text",), dim=DIM,
    inputs=("input_ids", "attention_mask"), max_length=16, image_size=0, record_fields=(),
    duplicate_threshold=0.9, match_threshold=0.7, ood_threshold=0.5, platt_a=20.0, platt_b=-17.0,
    preprocessing_digest="d", max_batch_size=8,
)
MODEL = items_pb2.ModelRef(name="unit", version="1")
TOPIC = "items.embedded"

MakeItem = Callable[..., items_pb2.EmbeddedItem]
MakeRecord = Callable[..., ConsumerRecord]


def unit(angle_deg: float) -> list[float]:
    """A unit vector at ``angle_deg`` from the first axis: cosine(a, b) = cos(a - b)."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0], vector[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return vector.tolist()


@pytest.fixture
def make_item() -> MakeItem:
    def make(item_id: str, angle: float = 0.0, ingest_ms: int = 1000, content_hash: str = "",
             ood: float = 0.1, model: items_pb2.ModelRef = MODEL, content: str = "") -> items_pb2.EmbeddedItem:
        item = items_pb2.Item(item_id=item_id, tenant=TENANT, collection="default",
                              modality=items_pb2.TEXT, content=(content or f"text of {item_id}").encode())
        return items_pb2.EmbeddedItem(
            accepted=items_pb2.AcceptedItem(item=item, content_hash=content_hash or f"h-{item_id}",
                                            ingest_time_ms=ingest_ms),
            vector=unit(angle), model=model, ood_score=ood)
    return make


@pytest.fixture
def make_record() -> MakeRecord:
    """A consumed record of an embedded item or a store command, at ``offset``."""
    def make(message: items_pb2.EmbeddedItem | items_pb2.StoreCommand, offset: int = 0,
             timestamp_ms: int = 0, value: bytes | None = None) -> ConsumerRecord:
        headers: list[tuple[str, bytes]] = []
        if isinstance(message, items_pb2.StoreCommand):  # as store_commands publishes them
            key = scope_key(message.tenant, message.collection)
            headers = [(HEADER, STORE_COMMAND)]
        else:
            it = message.accepted.item
            key = row_key(it.tenant, it.collection, it.item_id).encode()
        body = message.SerializeToString() if value is None else value
        return ConsumerRecord(TOPIC, 0, -1, offset, timestamp_ms, 0, key, body, headers, None, len(key),
                              len(body), -1)
    return make


@pytest.fixture
def make_group(make_record: MakeRecord) -> Callable[[Sequence[items_pb2.EmbeddedItem]], Pending]:
    """The items as one collection/scope group of a batch (batch index = position)."""
    def make(items: Sequence[items_pb2.EmbeddedItem]) -> Pending:
        group = Pending("unit_unit_v1", BUNDLE, MODEL, TENANT, SCOPE)
        for index, item in enumerate(items):
            group.add(index, make_record(item, offset=index), item)
        return group
    return make


def hit(row: Mapping[str, Any], score: float) -> Hit:
    """A search result for a stored row (as ``VectorStore.search`` returns it)."""
    return Hit(str(row["pk"]), score, {k: row[k] for k in
                                       ("item_id", "cluster_id", "content_hash", "ingest_ms", "decision")})


@dataclass
class FakeStore:
    """The ``VectorStore`` calls the indexer makes, on dicts (one writer, no concurrency)."""

    live: bool = True
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    writes: int = 0

    def ensure_collection(self, model: items_pb2.ModelRef, dim: int, make_live: bool = True) -> str:
        name = f"unit_{model.name}_v{model.version}"
        self.rows.setdefault(name, {})
        return name

    def is_live(self, model: items_pb2.ModelRef, max_age_s: float = 2.0) -> bool:
        return self.live

    def collections(self) -> list[str]:
        return list(self.rows)

    def has_signals(self, collection: str) -> bool:
        return True

    def get(self, collection: str, pks: Sequence[str], fields: Sequence[str] = (),
            consistency: str | None = None) -> dict[str, dict[str, Any]]:
        stored = self.rows.get(collection, {})
        return {pk: copy.deepcopy(stored[pk]) for pk in pks if pk in stored}

    def query(self, collection: str, expr: str, fields: Sequence[str] = (),
              consistency: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        found = [copy.deepcopy(row) for row in self.rows.get(collection, {}).values() if _matches(expr, row)]
        return found if limit is None else found[:limit]

    def search(self, collection: str, vectors: np.ndarray, limit: int, expr: str,
               fields: Sequence[str] = (), consistency: str | None = None) -> list[list[Hit]]:
        rows = self.query(collection, expr)
        out = []
        for vector in np.asarray(vectors, dtype=np.float32):
            scored = sorted(((float(np.dot(vector, np.asarray(r["vector"], np.float32))), r) for r in rows),
                            key=lambda t: -t[0])
            out.append([Hit(str(r["pk"]), s, {k: v for k, v in r.items() if k != "vector"})
                        for s, r in scored[:limit]])
        return out

    def upsert(self, collection: str, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self.rows.setdefault(collection, {})[str(row["pk"])] = copy.deepcopy(dict(row))
            self.writes += 1

    def tombstone(self, collection: str, pks: Sequence[str], now_ms: int,
                  ingested_before_ms: int | None = None) -> int:
        rows = [r for r in self.get(collection, pks).values() if not r["deleted_ms"]
                and (ingested_before_ms is None or int(r["ingest_ms"]) < ingested_before_ms)]
        for row in rows:
            row["deleted_ms"] = now_ms
        self.upsert(collection, rows)
        return len(rows)

    def relabel_clusters(self, collection: str, scope: str, losers: Sequence[str], winner: str) -> int:
        rows = [r for r in self.query(collection, scope) if r["cluster_id"] in losers]
        for row in rows:
            row["cluster_id"] = winner
        self.upsert(collection, rows)
        return len(rows)

    def purge_tombstones(self, collection: str, pks: Sequence[str], deleted_before_ms: int) -> int:
        stored = self.rows.get(collection, {})
        gone = [pk for pk in pks if pk in stored and 0 < int(stored[pk]["deleted_ms"]) < deleted_before_ms]
        for pk in gone:
            del stored[pk]
        return len(gone)

    def flush(self, collection: str) -> None:
        return None


def _matches(expr: str, row: Mapping[str, Any]) -> bool:
    """A Milvus boolean filter of ``==``, ``in [...]``, ``>=`` and ``and`` is Python as well."""
    return bool(eval(expr, {"__builtins__": {}}, dict(row)))


@dataclass
class FakeCalibrations:
    """``CalibrationStore`` on a dict, stored as JSON as the real one is."""

    states: dict[str, str] = field(default_factory=dict)
    key = staticmethod(CalibrationStore.key)

    def load(self, key: str) -> CollectionState:
        return CollectionState.from_json(self.states[key]) if key in self.states else CollectionState()

    def save(self, key: str, state: CollectionState) -> None:
        self.states[key] = state.to_json()


@pytest.fixture
def fake_store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def make_indexer() -> Callable[..., Indexer]:
    """An Indexer on a ``FakeStore`` (a new one unless given) with in-memory calibrations."""
    def make(store: FakeStore | None = None, calibrations: FakeCalibrations | None = None) -> Indexer:
        return Indexer(Settings(service="indexing"), cast(VectorStore, store or FakeStore()), [BUNDLE],
                       cast(CalibrationStore, calibrations or FakeCalibrations()))
    return make
