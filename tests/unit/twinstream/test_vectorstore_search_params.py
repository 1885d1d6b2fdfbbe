"""The search parameters VectorStore sends (a recording fake client stands in for Milvus)."""

from __future__ import annotations

from typing import Any

from twinstream.common.metrics import Metrics
from twinstream.common.vectorstore import DEFAULT_EF, MATCH_CONSISTENCY, VectorStore


class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def search(self, collection: str, **kwargs: Any) -> list[list[Any]]:
        self.calls.append(kwargs)
        return [[] for _ in kwargs["data"]]


def _store() -> tuple[VectorStore, RecordingClient]:
    store = object.__new__(VectorStore)  # no connection: only the request is under test
    client = RecordingClient()
    store.client, store.ef, store.metrics = client, DEFAULT_EF, Metrics.unexported()
    return store, client


def test_hnsw_ef_covers_a_deep_page() -> None:
    store, client = _store()
    store.search("c", [[1.0, 0.0]], limit=11, expr="", offset=90)
    assert client.calls[0]["search_params"]["params"]["ef"] >= 101, "Milvus rejects ef < offset + limit"


def test_searches_are_strong_unless_the_caller_asks_otherwise() -> None:
    store, client = _store()
    store.search("c", [[1.0, 0.0]], limit=5, expr="")
    store.search("c", [[1.0, 0.0]], limit=5, expr="", consistency=MATCH_CONSISTENCY, ef=128)
    assert [c["consistency_level"] for c in client.calls] == ["Strong", "Bounded"]
    assert [c["search_params"]["params"]["ef"] for c in client.calls] == [DEFAULT_EF, 128]
