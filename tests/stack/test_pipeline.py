"""The whole pipeline on the running stack: decisions, the index and the Matching API."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from stack_helpers import first, read_decisions, record
from twinstream.client import TwinstreamClient
from twinstream.common.vectorstore import VectorStore
from twinstream.devstack import LocalStack
from twinstream.v1 import decisions_pb2, items_pb2, matching_pb2

pytestmark = pytest.mark.stack

# FEBRL-shaped records: the base bundle is calibrated (and its OOD score fitted) on FEBRL.
ORIGINAL = {"given_name": "margaret", "surname": "thompson", "street_number": "12",
            "address_1": "acacia avenue", "suburb": "kingston", "postcode": "2604", "state": "act",
            "date_of_birth": "19710304", "soc_sec_id": "4417293"}
TYPO = {**ORIGINAL, "suburb": "kingstown"}    # cosine about 0.92 with the base bundle
LATER = {**TYPO, "postcode": "2640"}            # about 0.99
OTHER = {"given_name": "jack", "surname": "o'brien", "street_number": "501",
         "address_1": "wattle street", "suburb": "broome", "postcode": "6725", "state": "wa",
         "date_of_birth": "19880921", "soc_sec_id": "9038112"}


@pytest.fixture
def client(stack: LocalStack) -> Iterator[TwinstreamClient]:
    with stack.client() as c:
        yield c


def test_a_burst_of_copies_is_caught_within_the_batch(client: TwinstreamClient, stack: LocalStack,
                                                       tenant: str) -> None:
    # One stream call: the copies reach the indexer together, before any is in Milvus.
    client.ingest_many([record("orig", ORIGINAL, tenant), record("exact", ORIGINAL, tenant),
                        record("typo", TYPO, tenant), record("other", OTHER, tenant)])
    decisions = first(read_decisions(stack, ["orig", "exact", "typo", "other"], tenant))
    assert decisions["orig"].kind == decisions_pb2.NOVEL
    assert decisions["exact"].kind == decisions_pb2.EXACT_DUPLICATE
    assert decisions["exact"].duplicate_of == "orig"
    assert decisions["typo"].kind == decisions_pb2.NEAR_DUPLICATE
    assert decisions["typo"].duplicate_of in ("orig", "exact")
    assert decisions["typo"].cluster_id == "orig"
    assert decisions["typo"].score >= decisions["typo"].thresholds.duplicate
    assert decisions["other"].kind == decisions_pb2.NOVEL
    assert decisions["typo"].model.name == "twinstream_text" and decisions["typo"].neighbours

    # A later copy is decided against what is now in Milvus.
    client.ingest(record("later", LATER, tenant))
    later = first(read_decisions(stack, ["later"], tenant))["later"]
    assert later.kind == decisions_pb2.NEAR_DUPLICATE and later.cluster_id == "orig"
    assert not any(n.in_flight for n in later.neighbours)

    store = VectorStore(stack.milvus_uri)
    live = store.alias_name("twinstream_text")
    rows = store.query(live, f'tenant == "{tenant}"', ["pk", "item_id", "cluster_id"])
    assert sorted(r["item_id"] for r in rows) == ["exact", "later", "orig", "other", "typo"]


def test_match_get_cluster_delete_and_tenant_isolation(client: TwinstreamClient, stack: LocalStack,
                                                      tenant: str) -> None:
    other_tenant = tenant + "x"
    client.ingest_many([record("a", ORIGINAL, tenant, colour="red"),
                        record("b", TYPO, tenant, colour="blue"),
                        record("c", OTHER, tenant, colour="red")])
    client.ingest(record("secret", ORIGINAL, other_tenant))
    read_decisions(stack, ["a", "b", "c"], tenant)
    read_decisions(stack, ["secret"], other_tenant)

    top = client.match(tenant, item_id="a", k=5)
    assert [r.item_id for r in top.results][:1] == ["b"]
    assert "a" not in [r.item_id for r in top.results]
    assert "secret" not in [r.item_id for r in top.results]
    assert top.results[0].score > 0.9 and top.model.name == "twinstream_text"

    by_content = client.match(tenant, content=json.dumps(ORIGINAL).encode(),
                              modality=items_pb2.RECORD, k=2)
    assert by_content.results[0].item_id == "a" and by_content.results[0].score > 0.999

    filtered = client.match(tenant, item_id="a", k=5, filters=[matching_pb2.MetadataCondition(
        key="colour", op=matching_pb2.MetadataCondition.EQ, values=["red"])])
    assert [r.item_id for r in filtered.results] == ["c"]

    ranged = client.match(tenant, item_id="a", k=5, min_score=0.9)
    assert [r.item_id for r in ranged.results] == ["b"]

    page1 = client.match(tenant, item_id="c", k=1)
    page2 = client.match(tenant, item_id="c", k=1, page_token=page1.next_page_token)
    assert page1.next_page_token and page1.results[0].item_id != page2.results[0].item_id

    stored = client.get(tenant, "b")
    assert stored.decision.kind == decisions_pb2.NEAR_DUPLICATE and stored.metadata["colour"] == "blue"
    cluster = client.cluster(tenant, "b")
    assert cluster.canonical_item_id == "a" and sorted(cluster.member_ids) == ["a", "b"]

    with pytest.raises(grpc.RpcError) as caught:
        client.get(other_tenant, "a")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    assert client.delete(tenant, ["b"]) == 1
    after = client.match(tenant, item_id="a", k=5)
    assert "b" not in [r.item_id for r in after.results]
    with pytest.raises(grpc.RpcError) as caught:
        client.get(tenant, "b")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("request_fields", "code"), [
    ({"tenant": ""}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"tenant": "a\"b"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"k": 1_000_000}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ({"min_score": 2.0}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"page_token": "garbage"}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"item_id": "does-not-exist"}, grpc.StatusCode.NOT_FOUND),
    ({"vector": matching_pb2.QueryVector(values=[0.1, 0.2])}, grpc.StatusCode.INVALID_ARGUMENT),
    ({"item_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_match_requests_get_precise_statuses(client: TwinstreamClient, tenant: str,
                                                 request_fields: dict[str, object],
                                                 code: grpc.StatusCode) -> None:
    fields: dict[str, object] = {"tenant": tenant, "item_id": "whatever"}
    fields.update(request_fields)
    with pytest.raises(grpc.RpcError) as caught:
        client.matching.Match(matching_pb2.MatchRequest(**fields), timeout=10)  # type: ignore[arg-type]
    assert caught.value.code() == code
    assert caught.value.details()


def test_health_and_reflection_are_on(stack: LocalStack) -> None:
    for service in ("ingestion", "matching", "embedding", "indexing"):
        with stack.channel(service) as channel:
            names = ProtoReflectionDescriptorDatabase(channel).get_services()
            assert "grpc.health.v1.Health" in names
            if service == "matching":
                assert "twinstream.v1.Matching" in names
            if service == "ingestion":
                assert "twinstream.v1.Ingestion" in names
