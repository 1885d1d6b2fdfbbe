"""The Matching servicer in-process (grpc_testing) behind the real interceptor, with a fake
vector store and a fake encoder from factory fixtures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import grpc_testing
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from twinstream.common.config import Settings
from twinstream.common.encoding import ItemEncoder
from twinstream.common.errors import TransientError
from twinstream.common.metrics import Metrics
from twinstream.common.vectorstore import Hit, VectorStore
from twinstream.matching.service import Matching
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import items_pb2, matching_pb2
from unit.in_process import serve, unary

SERVICE = matching_pb2.DESCRIPTOR.services_by_name["Matching"]
DIM = 4
BUNDLE = ModelBundle(
    path=Path(__file__).resolve().parents[3] / "var" / "models" / "twinstream_text" / "1",
    name="unit", version="1", modalities=("text",), dim=DIM, inputs=("input_ids", "attention_mask"),
    max_length=16, image_size=0, record_fields=(), duplicate_threshold=0.85, match_threshold=0.7,
    ood_threshold=0.5, platt_a=20.0, platt_b=-17.0, preprocessing_digest="d", max_batch_size=8,
    manifest={},
)


@dataclass
class FakeStore:
    """The VectorStore calls Match makes; ``down`` fails a search like an unreachable Milvus."""

    hits: list[Hit] = field(default_factory=list)
    down: bool = False
    searched: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, Any]] | None = field(default_factory=dict)  # None: no collection yet
    calls: list[str] = field(default_factory=list)  # the Milvus round trips made

    def is_live(self, model: items_pb2.ModelRef) -> bool:
        return True

    def alias_name(self, model_name: str) -> str:
        return f"unit_{model_name}"

    def exists(self, name: str) -> bool:
        self.calls.append("exists")
        return self.rows is not None

    def get(self, collection: str, pks: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        self.calls.append("get")
        if self.rows is None:
            raise RuntimeError(f"collection not found[collection={collection}]")  # as pymilvus says it
        return {pk: self.rows[pk] for pk in pks if pk in self.rows}

    def search(self, collection: str, vectors: Sequence[Sequence[float]], limit: int, expr: str,
               **options: Any) -> list[list[Hit]]:
        self.calls.append("search")
        if self.down:
            raise TransientError("Milvus is unavailable: connection refused")
        self.searched.append(expr)
        return [self.hits[:limit]]


@dataclass
class FakeEncoder:
    """Encodes every input to the same unit vector; ``down`` fails like an unreachable Triton."""

    down: bool = False
    backend: str = "fake"

    def encode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self.down:
            raise TransientError("Triton is unavailable")
        rows = len(next(iter(inputs.values())))
        return np.tile(np.eye(DIM, dtype=np.float32)[0], (rows, 1)), np.zeros(rows, np.float32)


Served = tuple[grpc_testing.Server, FakeStore, FakeEncoder, Metrics]
MakeServed = Callable[..., Served]


@pytest.fixture
def make_matching() -> MakeServed:
    """Factory: an in-process Matching server over fakes, counting on a fresh registry."""
    def make(hits: Sequence[Hit] = ()) -> Served:
        store, encoder = FakeStore(list(hits)), FakeEncoder()
        metrics = Metrics.create(CollectorRegistry())
        service = Matching(Settings(service="matching"), cast(VectorStore, store),
                           [ItemEncoder(BUNDLE, encoder, metrics)], lambda messages: None)
        return serve(service, SERVICE, metrics), store, encoder, metrics
    return make


def hit(item_id: str, score: float) -> Hit:
    return Hit(f"acme/default/{item_id}", score, {"item_id": item_id, "cluster_id": item_id,
                                                  "ingest_ms": 1, "metadata": {}, "decision": ""})


def by_content(text: str = "a lamp", **fields: Any) -> matching_pb2.MatchRequest:
    return matching_pb2.MatchRequest(tenant="acme", content=matching_pb2.QueryContent(
        modality=items_pb2.TEXT, content=text.encode()), **fields)


def handled(metrics: Metrics, code: str) -> float:
    return metrics.registry.get_sample_value("twinstream_grpc_server_handled_total", {
        "grpc_type": "unary", "grpc_service": SERVICE.full_name, "grpc_method": "Match",
        "grpc_code": code}) or 0.0


def test_a_valid_query_answers_the_hits_with_their_probability(make_matching: MakeServed) -> None:
    server, store, _encoder, metrics = make_matching([hit("a", 0.95), hit("b", 0.5)])
    response, code, _details = unary(server, SERVICE, "Match", by_content(k=5))
    assert code == grpc.StatusCode.OK
    assert [(r.item_id, round(r.score, 2)) for r in response.results] == [("a", 0.95), ("b", 0.5)]
    assert response.results[0].duplicate_probability > response.results[1].duplicate_probability
    assert 'tenant == "acme"' in store.searched[0]
    assert handled(metrics, "OK") == 1
    assert metrics.registry.get_sample_value("twinstream_encoder_batch_seconds_count",
                                             {"backend": "fake"}) == 1


@pytest.mark.parametrize(("request_fields", "says"), [
    ({"k": -1}, "k must be positive"),
    ({"min_score": 2.0}, "min_score must be within [0, 1]"),
])
def test_a_bad_request_is_invalid_argument_saying_what_to_fix(
        make_matching: MakeServed, request_fields: dict[str, Any], says: str) -> None:
    server, store, _encoder, metrics = make_matching()
    _response, code, details = unary(server, SERVICE, "Match", by_content(**request_fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert says in details
    assert not store.searched
    assert handled(metrics, "INVALID_ARGUMENT") == 1


def test_a_request_without_a_tenant_is_invalid_argument(make_matching: MakeServed) -> None:
    server, _store, _encoder, _metrics = make_matching()
    request = matching_pb2.MatchRequest(vector=matching_pb2.QueryVector(values=[1.0, 0, 0, 0]))
    _response, code, details = unary(server, SERVICE, "Match", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tenant is required" in details


def test_a_milvus_outage_is_unavailable(make_matching: MakeServed) -> None:
    server, store, _encoder, metrics = make_matching([hit("a", 0.9)])
    store.down = True
    _response, code, details = unary(server, SERVICE, "Match", by_content())
    assert code == grpc.StatusCode.UNAVAILABLE and "Milvus" in details
    assert handled(metrics, "UNAVAILABLE") == 1


def test_an_encoder_outage_is_unavailable(make_matching: MakeServed) -> None:
    server, _store, encoder, _metrics = make_matching()
    encoder.down = True
    _response, code, details = unary(server, SERVICE, "Match", by_content())
    assert code == grpc.StatusCode.UNAVAILABLE and "Triton" in details


def stored(item_id: str) -> dict[str, Any]:
    return {"pk": f"acme/default/{item_id}", "item_id": item_id, "vector": [1.0, 0.0, 0.0, 0.0],
            "cluster_id": item_id, "ingest_ms": 1, "event_ms": 1, "deleted_ms": 0, "metadata": {},
            "decision": "", "content_hash": "h"}


def test_match_by_item_id_is_one_lookup_and_one_search(make_matching: MakeServed) -> None:
    # Checking that the collection exists before each lookup cost one or two more round trips
    # to Milvus per call; it is asked only after a lookup failed.
    server, store, _encoder, _metrics = make_matching([hit("b", 0.9)])
    store.rows = {"acme/default/a": stored("a")}
    response, code, _details = unary(server, SERVICE, "Match",
                                     matching_pb2.MatchRequest(tenant="acme", item_id="a", k=3))
    assert code == grpc.StatusCode.OK and [r.item_id for r in response.results] == ["b"]
    assert store.calls == ["get", "search"]
    assert 'item_id != "a"' in store.searched[0], "the item itself is left out"


def test_an_item_of_a_model_that_has_indexed_nothing_is_not_found(make_matching: MakeServed) -> None:
    server, store, _encoder, _metrics = make_matching()
    store.rows = None
    _response, code, details = unary(server, SERVICE, "Get", matching_pb2.GetRequest(tenant="acme", item_id="a"))
    assert code == grpc.StatusCode.NOT_FOUND and "'a' not found" in details
    assert store.calls == ["get", "exists"]
