"""Bad and unusual input on the live stack: ids as real keys look, non-ASCII filters, poison
records in a stream and on items.raw. Nothing here may end in UNKNOWN/INTERNAL or block anyone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack_helpers import first, read_decisions, record, text
from twinstream.client import TwinstreamClient
from twinstream.common.kafka import TopicReader, make_producer
from twinstream.devstack import LocalStack
from twinstream.v1 import decisions_pb2, ingestion_pb2, ingestion_pb2_grpc, items_pb2, matching_pb2

pytestmark = pytest.mark.stack

# Keys as bibliographic ids, URLs and paths spell them, plus characters an expression must escape.
ODD_IDS = ["10.1145/3299869.3319876", "https://example.org/a?b=c&d=%20#frag", "with space/and ü",
           "東京/駅 😀", 'quote"and\\backslash', "tenant/collection/lookalike"]
POISON = {
    "nested_5000_deep": b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "integer_of_5000_digits": b'{"a": ' + b"9" * 5000 + b"}",
    "lone_surrogate": b'{"a": "\\ud800"}',
}


@pytest.fixture
def client(stack: LocalStack) -> Iterator[TwinstreamClient]:
    with stack.client() as c:
        yield c


def test_ids_with_slashes_queries_spaces_and_non_ascii_work_end_to_end(
        client: TwinstreamClient, stack: LocalStack, tenant: str) -> None:
    same = "one story, several keys: all of them exact copies of each other"
    summary = client.ingest_many([text(i, same, tenant) for i in ODD_IDS]
                                 + [text("plain", "an unrelated note about the weather", tenant)])
    assert summary.accepted == len(ODD_IDS) + 1, list(summary.rejections)
    decided = first(read_decisions(stack, [*ODD_IDS, "plain"], tenant))
    assert {decided[i].kind for i in ODD_IDS[1:]} == {decisions_pb2.EXACT_DUPLICATE}
    for item_id in ODD_IDS:
        assert client.get(tenant, item_id).item_id == item_id
    cluster = client.cluster(tenant, ODD_IDS[-1])
    assert sorted(cluster.member_ids) == sorted(ODD_IDS)
    matched = client.match(tenant, item_id=ODD_IDS[4], k=10)
    assert {r.item_id for r in matched.results} >= set(ODD_IDS) - {ODD_IDS[4]}
    assert ODD_IDS[4] not in {r.item_id for r in matched.results}, "include_self=false holds"
    assert client.delete(tenant, [ODD_IDS[2], ODD_IDS[3]]) == 2
    for item_id in ODD_IDS[2:4]:
        with pytest.raises(grpc.RpcError) as caught:
            client.get(tenant, item_id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert sorted(client.cluster(tenant, ODD_IDS[0]).member_ids) == sorted(
        set(ODD_IDS) - set(ODD_IDS[2:4]))


def _eq(key: str, value: str) -> matching_pb2.MetadataCondition:
    return matching_pb2.MetadataCondition(key=key, op=matching_pb2.MetadataCondition.EQ, values=[value])


def test_filters_on_non_ascii_values_find_their_items(client: TwinstreamClient, stack: LocalStack,
                                                      tenant: str) -> None:
    items = [text("zh", "a flat to rent near the lake", tenant, city="Zürich", mood="😀"),
             text("ge", "a flat to rent near the lake", tenant, city="Genève", mood="☔"),
             text("nl", "a flat to rent near the lake", tenant, city='new\nline "quoted"', mood="x")]
    client.ingest_many(items)
    read_decisions(stack, ["zh", "ge", "nl"], tenant)
    query = "a flat to rent near the lake"
    assert [r.item_id for r in client.match(tenant, text=query, filters=[_eq("city", "Zürich")]).results] == ["zh"]
    assert [r.item_id for r in client.match(tenant, text=query, filters=[_eq("mood", "😀")]).results] == ["zh"]
    either = matching_pb2.MetadataCondition(key="city", op=matching_pb2.MetadataCondition.IN,
                                            values=["Genève", 'new\nline "quoted"'])
    assert sorted(r.item_id for r in client.match(tenant, text=query, filters=[either]).results) == ["ge", "nl"]
    assert client.match(tenant, text=query, filters=[_eq("city", "Zurich")]).results == []
    assert client.delete(tenant, filters=[_eq("city", "Genève")]) == 1


def test_a_stream_with_a_poison_record_accepts_and_decides_the_other_nine(
        client: TwinstreamClient, stack: LocalStack, tenant: str) -> None:
    items = [record(f"r{i}", {"given_name": f"name{i}", "surname": "stream"}, tenant) for i in range(10)]
    items[6].content = POISON["nested_5000_deep"]
    summary = client.ingest_many(items)
    assert summary.accepted == 9
    assert [(r.index, r.reason) for r in summary.rejections] == [(6, "invalid_record")]
    read_decisions(stack, list(summary.item_ids), tenant)


def test_poison_on_items_raw_is_dead_lettered_while_another_tenant_is_decided(
        stack: LocalStack, tenant: str) -> None:
    settings = stack.settings()
    producer = make_producer(settings)
    poison = {case: record(f"p-{case}", {"x": "y"}, tenant) for case in POISON}
    poison["newline_tenant"] = text("p-newline", "x", tenant + "\n")
    for case, item in poison.items():
        if case in POISON:
            item.content = POISON[case]
        producer.send(settings.topics.raw, key=tenant.encode(), value=item.SerializeToString())
    canary_tenant = tenant + "c"
    producer.send(settings.topics.raw, key=canary_tenant.encode(),
                  value=text("canary", "a canary in another tenant", canary_tenant).SerializeToString())
    producer.flush()
    producer.close()
    read_decisions(stack, ["canary"], canary_tenant, timeout_s=60)
    wanted = {item.SerializeToString(): case for case, item in poison.items()}
    reader = TopicReader(settings, settings.topics.dlq)
    letters: dict[str, items_pb2.DeadLetter] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(letters) < len(wanted):
        for raw in reader.poll():
            letter = items_pb2.DeadLetter.FromString(raw.value)
            if letter.payload in wanted:
                letters[wanted[letter.payload]] = letter
    reader.close()
    assert {case: letter.reason for case, letter in letters.items()} == {
        **{case: "invalid_record" for case in POISON}, "newline_tenant": "invalid_tenant"}


def test_control_characters_and_overlong_ids_are_invalid_argument(client: TwinstreamClient,
                                                                  tenant: str) -> None:
    for item_id in ["line\nbreak", "x" * 257, "ü" * 129]:
        with pytest.raises(grpc.RpcError) as caught:
            client.ingest(text(item_id, "x", tenant))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(caught.value.details()).startswith("invalid_id: ")
    for call in (lambda: client.get(tenant, "line\nbreak"), lambda: client.cluster(tenant, "x" * 257)):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_content_query_is_invalid_argument(client: TwinstreamClient, tenant: str) -> None:
    for content in [*POISON.values(), b"[1, 2]", json.dumps({"a": {"b": 1}}).encode()]:
        with pytest.raises(grpc.RpcError) as caught:
            client.match(tenant, content=content, modality=items_pb2.RECORD)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


def test_an_ingest_request_with_a_poison_record_is_invalid_argument(client: TwinstreamClient,
                                                                    tenant: str) -> None:
    for content in POISON.values():
        item = record("p", {"x": "y"}, tenant)
        item.content = content
        with pytest.raises(grpc.RpcError) as caught:
            client.ingestion.Ingest(ingestion_pb2.IngestRequest(item=item), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(caught.value.details()).startswith("invalid_record: ")


# A fuzz of both Ingestion methods: every answer is OK or a client/outage code, never
# UNKNOWN/INTERNAL, and a stream always answers with one outcome per item.
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
texts = st.one_of(st.text(max_size=70), st.sampled_from(["fuzzer", "acme\n", "a/b", "", "ü" * 129]))
contents = st.one_of(st.binary(max_size=200), st.sampled_from(list(POISON.values())),
                     st.text(max_size=100).map(str.encode))
items = st.builds(items_pb2.Item, item_id=texts, tenant=st.one_of(st.just("fuzzer"), texts),
                  collection=texts, modality=st.integers(0, 4), content=contents,
                  content_type=st.sampled_from(["", "text/plain", "application/json", "image/png", "x"]),
                  metadata=st.dictionaries(texts, st.text(max_size=20), max_size=3))
ingest_requests = st.builds(ingestion_pb2.IngestRequest, item=items, assign_id=st.booleans())


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(ingest_requests, min_size=1, max_size=4))
def test_random_ingest_requests_never_end_in_unknown_or_internal(
        stack: LocalStack, batch: list[ingestion_pb2.IngestRequest]) -> None:
    with stack.channel("ingestion") as channel:
        stub = ingestion_pb2_grpc.IngestionStub(channel)
        try:
            stub.Ingest(batch[0], timeout=20)
        except grpc.RpcError as error:
            assert error.code() not in FORBIDDEN, (error.code(), error.details())
        try:
            summary = stub.IngestStream(iter(batch), timeout=20)
        except grpc.RpcError as error:
            assert error.code() not in FORBIDDEN, (error.code(), error.details())
            return
    assert summary.accepted + summary.rejected == len(batch)


def test_an_id_crafted_as_an_expression_touches_no_other_tenant(
        client: TwinstreamClient, stack: LocalStack, tenant: str) -> None:
    other = tenant + "o"
    client.ingest(text("kept", "an item of another tenant", other))
    read_decisions(stack, ["kept"], other)
    for crafted in [f"x','{other}/default/kept", f'x", "{other}/default/kept', "x'] or pk != ['"]:
        assert client.delete(tenant, [crafted]) == 0
        with pytest.raises(grpc.RpcError) as caught:
            client.get(tenant, crafted)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.get(other, "kept").item_id == "kept"
