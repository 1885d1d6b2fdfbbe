"""Streaming dedup and the match API in depth: cluster merges, deletes that stay deleted,
time-to-live, filters, streaming, freshness, and a property-based fuzz of the live server."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack_helpers import first, read_decisions, record
from twinstream.client import TwinstreamClient
from twinstream.common.kafka import make_producer
from twinstream.common.vectorstore import VectorStore
from twinstream.devstack import LocalStack
from twinstream.v1 import decisions_pb2, items_pb2, matching_pb2

pytestmark = pytest.mark.stack

DIM = 384


@pytest.fixture
def client(stack: LocalStack) -> Iterator[TwinstreamClient]:
    with stack.client() as c:
        yield c


def unit(angle_deg: float) -> list[float]:
    """A unit vector at ``angle_deg`` from e0 in the e0-e1 plane."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[0], vector[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return vector.tolist()


def embedded(tenant: str, item_id: str, vector: list[float], ingest_ms: int) -> items_pb2.EmbeddedItem:
    item = items_pb2.Item(item_id=item_id, tenant=tenant, collection="default",
                          modality=items_pb2.TEXT, content=item_id.encode())
    return items_pb2.EmbeddedItem(
        accepted=items_pb2.AcceptedItem(item=item, content_hash=f"hash-{item_id}",
                                        ingest_time_ms=ingest_ms, source="test"),
        vector=vector, model=items_pb2.ModelRef(name="twinstream_text", version="1"), ood_score=0.0)


def publish_embedded(stack: LocalStack, messages: list[items_pb2.EmbeddedItem]) -> None:
    """Feed the indexer directly (what the embedding service would publish)."""
    settings_ = stack.settings()
    producer = make_producer(settings_)
    for message in messages:
        key = f"{message.accepted.item.tenant}/default".encode()
        producer.send(settings_.topics.embedded, key=key, value=message.SerializeToString())
    producer.flush()
    producer.close()


def test_an_item_linking_two_clusters_merges_them_into_the_oldest(
        client: TwinstreamClient, stack: LocalStack, tenant: str) -> None:
    now = int(time.time() * 1000)
    # A and B are 60 degrees apart (cosine 0.5: not even a match for the base bundle's prose or
    # record thresholds); C sits between (0.87 to each: a duplicate of both).
    publish_embedded(stack, [embedded(tenant, "A", unit(0), now),
                             embedded(tenant, "B", unit(60), now + 1)])
    before = first(read_decisions(stack, ["A", "B"], tenant))
    assert before["A"].cluster_id == "A" and before["B"].cluster_id == "B"
    assert before["B"].kind == decisions_pb2.NOVEL
    publish_embedded(stack, [embedded(tenant, "C", unit(30), now + 2)])
    merged = first(read_decisions(stack, ["C"], tenant))["C"]
    assert merged.kind == decisions_pb2.NEAR_DUPLICATE
    assert merged.cluster_id == "A" and list(merged.merged_clusters) == ["B"]
    for member in ("A", "B", "C"):
        cluster = client.cluster(tenant, member)
        assert cluster.cluster_id == "A" and cluster.canonical_item_id == "A"
        assert sorted(cluster.member_ids) == ["A", "B", "C"]


def test_deleted_items_never_come_back_even_when_a_message_is_replayed(
        client: TwinstreamClient, stack: LocalStack, tenant: str) -> None:
    message = embedded(tenant, "gone", unit(70), int(time.time() * 1000))
    publish_embedded(stack, [message, embedded(tenant, "stays", unit(72), message.accepted.ingest_time_ms + 1)])
    original = first(read_decisions(stack, ["gone", "stays"], tenant))["gone"]
    assert client.delete(tenant, ["gone"]) == 1
    assert client.delete(tenant, ["gone"]) == 0, "deleting twice is a no-op"
    publish_embedded(stack, [message])  # a replay of the same message after the delete
    copies = read_decisions(stack, ["gone"], tenant)["gone"]
    deadline = time.monotonic() + 30
    while len(copies) < 2 and time.monotonic() < deadline:
        copies = read_decisions(stack, ["gone"], tenant)["gone"]
    assert len(copies) >= 2 and all(c.SerializeToString() == original.SerializeToString()
                                    for c in copies)
    with pytest.raises(grpc.RpcError) as caught:
        client.get(tenant, "gone")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    found = client.match(tenant, vector=unit(70), k=10)
    assert [r.item_id for r in found.results] == ["stays"]


def test_delete_by_filter_and_time_window(client: TwinstreamClient, stack: LocalStack,
                                          tenant: str) -> None:
    base = {"surname": "filter", "state": "nsw"}
    client.ingest_many([record(f"f{i}", {**base, "given_name": f"n{i}", "postcode": str(3000 + i)},
                               tenant, batch="old" if i < 3 else "new") for i in range(6)])
    decisions = first(read_decisions(stack, [f"f{i}" for i in range(6)], tenant))
    cut = decisions["f3"].ingest_time_ms
    window = client.match(tenant, item_id="f0", k=10, from_time_ms=cut)
    expected = {i for i, d in decisions.items() if d.ingest_time_ms >= cut and i != "f0"}
    assert {r.item_id for r in window.results} == expected
    before = client.match(tenant, item_id="f5", k=10, to_time_ms=cut)
    assert {r.item_id for r in before.results} == {
        i for i, d in decisions.items() if d.ingest_time_ms < cut}
    in_filter = matching_pb2.MetadataCondition(key="batch", op=matching_pb2.MetadataCondition.IN,
                                               values=["old"])
    assert client.delete(tenant, filters=[in_filter]) == 3
    left = client.match(tenant, item_id="f4", k=10)
    assert {r.item_id for r in left.results} == {"f3", "f5"}


def test_ttl_expires_items_of_that_collection_only(client: TwinstreamClient, stack: LocalStack,
                                                   tenant: str) -> None:
    fields = {"given_name": "ttl", "surname": "expiry", "postcode": "2000"}
    client.ingest(record("short", fields, tenant, collection="ephemeral"))
    client.ingest(record("long", fields, tenant))
    read_decisions(stack, ["short"], tenant)
    read_decisions(stack, ["long"], tenant)
    time.sleep(4.5)  # the TTL of */ephemeral is 3 s; the reaper runs every second here
    with pytest.raises(grpc.RpcError) as caught:
        client.get(tenant, "short", collection="ephemeral")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.get(tenant, "long").item_id == "long"
    store = VectorStore(stack.milvus_uri)
    rows = store.query(store.alias_name("twinstream_text"),
                       f'tenant == "{tenant}" and collection == "ephemeral"', ["deleted_ms"])
    assert rows and all(r["deleted_ms"] > 0 for r in rows), "the reaper tombstoned the row"


def test_match_stream_answers_in_order_and_decisions_are_visible_at_once(
        client: TwinstreamClient, stack: LocalStack, tenant: str) -> None:
    ids = [f"s{i}" for i in range(8)]
    client.ingest_many([record(i, {"given_name": i, "surname": "stream", "postcode": "4000"},
                               tenant) for i in ids])
    decisions = read_decisions(stack, ids, tenant)
    for item_id in decisions:  # a published decision means the row is already searchable
        assert client.get(tenant, item_id).decision.item_id == item_id
    requests = [matching_pb2.MatchRequest(tenant=tenant, item_id=i, k=3, request_id=f"r{n}")
                for n, i in enumerate(ids)]
    responses = list(client.match_stream(requests))
    assert [r.request_id for r in responses] == [f"r{n}" for n in range(8)]
    assert all(len(r.results) == 3 for r in responses)


names = st.one_of(st.text(max_size=70), st.sampled_from(["victim", 'victim" or tenant != "',
                                                         "x) or (1 == 1", "*", ""]))
conditions = st.builds(
    matching_pb2.MetadataCondition, key=names,
    op=st.integers(min_value=-1, max_value=6).filter(lambda v: v >= 0),
    values=st.lists(names, max_size=4))
requests = st.builds(
    matching_pb2.MatchRequest,
    tenant=st.one_of(st.just("fuzzer"), names), collection=names,
    item_id=st.one_of(st.just("secret-0"), names), k=st.integers(-5, 5000),
    min_score=st.floats(allow_nan=True, allow_infinity=True, width=32),
    filters=st.lists(conditions, max_size=3), page_token=st.one_of(st.just(""), names),
    from_time_ms=st.integers(-(2**40), 2**41), to_time_ms=st.integers(-(2**40), 2**41))
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def victim(stack: LocalStack) -> set[str]:
    ids = [f"secret-{i}" for i in range(3)]
    with stack.client() as c:
        c.ingest_many([record(i, {"given_name": i, "surname": "victim"}, "victim") for i in ids])
    read_decisions(stack, ids, "victim")
    return set(ids)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests)
def test_random_requests_never_crash_or_leak(stack: LocalStack, victim: set[str],
                                             request: matching_pb2.MatchRequest) -> None:
    with stack.channel("matching") as channel:
        stub = matching_pb2_grpc_stub(channel)
        try:
            response = stub.Match(request, timeout=10)
        except grpc.RpcError as error:
            assert error.code() in ALLOWED, (error.code(), error.details())
            return
    if request.tenant != "victim":
        assert not victim & {r.item_id for r in response.results}


# Every other method of the Matching API, fuzzed the same way: any status but UNKNOWN/INTERNAL.
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
item_ids = st.one_of(st.just("secret-0"), names, st.text(min_size=250, max_size=300),
                     st.sampled_from(["a/b#c?d%20 e", "line\nbreak", 'q"uote\\', "東京 😀"]))
POISON = [b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"a": 1e999}', b'{"a": "\\ud800"}',
          b'{"a": ' + b"9" * 5000 + b"}"]
scopes = {"tenant": st.one_of(st.just("fuzzer"), names), "collection": names}
other_calls = st.one_of(
    st.tuples(st.just("Get"), st.builds(matching_pb2.GetRequest, item_id=item_ids, **scopes)),
    st.tuples(st.just("GetCluster"), st.builds(matching_pb2.GetClusterRequest, item_id=item_ids,
                                               **scopes)),
    st.tuples(st.just("Delete"), st.builds(matching_pb2.DeleteRequest, **scopes,
                                           item_ids=st.lists(item_ids, max_size=3),
                                           filters=st.lists(conditions, max_size=2))),
    st.tuples(st.just("MatchStream"), st.lists(requests, min_size=1, max_size=3)),
    st.tuples(st.just("Match"), st.builds(
        matching_pb2.MatchRequest, **scopes, k=st.integers(0, 20),
        content=st.builds(matching_pb2.QueryContent, modality=st.integers(0, 4),
                          content=st.one_of(st.binary(max_size=200), st.sampled_from(POISON))))),
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=other_calls)
def test_every_matching_method_answers_random_input_without_unknown_or_internal(
        stack: LocalStack, victim: set[str], call: tuple[str, object]) -> None:
    method, request = call
    if method == "Delete":
        assert isinstance(request, matching_pb2.DeleteRequest)
        if request.tenant == "victim":
            request.tenant = "fuzzer"  # the victim's rows must stay for the leak test
    with stack.channel("matching") as channel:
        stub = matching_pb2_grpc_stub(channel)
        try:
            if method == "MatchStream":
                assert isinstance(request, list)
                list(stub.MatchStream(iter(request), timeout=20))
            else:
                getattr(stub, method)(request, timeout=20)
        except grpc.RpcError as error:
            assert error.code() not in FORBIDDEN, (method, error.code(), error.details())


def matching_pb2_grpc_stub(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    from twinstream.v1 import matching_pb2_grpc

    return matching_pb2_grpc.MatchingStub(channel)
