"""On the live stack: Milvus restarts need no operator, Delete answers once indexing applied it,
and `twinstream decisions` reads back what was decided."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import pytest

from stack_helpers import read_decisions, record
from twinstream.cli import main
from twinstream.client import TwinstreamClient
from twinstream.common.vectorstore import VectorStore
from twinstream.devstack import LocalStack
from twinstream.v1 import matching_pb2, matching_pb2_grpc

pytestmark = pytest.mark.stack

T = TypeVar("T")
ADA = {"given_name": "ada", "surname": "lovelace", "postcode": "1815", "suburb": "marylebone"}
ALAN = {"given_name": "alan", "surname": "turing", "postcode": "1912", "suburb": "maida vale"}


@pytest.fixture
def client(stack: LocalStack) -> Iterator[TwinstreamClient]:
    with stack.client() as c:
        yield c


def eventually(call: Callable[[], T], timeout_s: float = 90.0) -> T:
    """``call()`` once it stops failing (Milvus is still starting), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_a_milvus_restart_needs_no_operator(stack: LocalStack, client: TwinstreamClient,
                                            tenant: str) -> None:
    client.ingest_many([record("before", ADA, tenant), record("other", ALAN, tenant)])
    read_decisions(stack, ["before", "other"], tenant)
    stack.restart_milvus()
    # no load_collection by hand: every read path loads what the restart released
    assert eventually(lambda: client.get(tenant, "before")).item_id == "before"
    found = eventually(lambda: client.match(tenant, item_id="before", k=5))
    assert [r.item_id for r in found.results][:1] == ["other"]
    client.ingest(record("after", ADA, tenant))  # an exact copy, decided after the restart
    after = read_decisions(stack, ["after"], tenant, timeout_s=180)["after"][0]
    assert after.duplicate_of == "before"
    store = VectorStore(stack.milvus_uri)
    rows = store.query(store.alias_name("twinstream_text"), f'tenant == "{tenant}"', ["pk"])
    assert sorted(r["pk"].rsplit("/", 1)[1] for r in rows) == ["after", "before", "other"]


def test_delete_answers_once_indexing_applied_it(stack: LocalStack, client: TwinstreamClient,
                                                 tenant: str) -> None:
    client.ingest_many([record("d1", ADA, tenant), record("d2", ALAN, tenant)])
    read_decisions(stack, ["d1", "d2"], tenant)
    with stack.channel("matching") as channel:
        stub = matching_pb2_grpc.MatchingStub(channel)
        response = stub.Delete(matching_pb2.DeleteRequest(tenant=tenant, item_ids=["d1", "d9"]),
                               timeout=30)
    assert (response.deleted, response.pending) == (1, False)
    with pytest.raises(grpc.RpcError) as caught:  # read-your-delete, no sleep
        client.get(tenant, "d1")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.get(tenant, "d2").item_id == "d2"


def test_decisions_command_reads_back_what_was_decided(stack: LocalStack, client: TwinstreamClient,
                                                       tenant: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    client.ingest_many([record("first", ADA, tenant), record("copy", ADA, tenant),
                        record("someone", ALAN, tenant)])
    read_decisions(stack, ["first", "copy", "someone"], tenant)
    capsys.readouterr()
    assert main(["decisions", "--kafka", stack.kafka_bootstrap, "--tenant", tenant, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_id = {row["item_id"]: row for row in rows}
    assert sorted(by_id) == ["copy", "first", "someone"], "each item once"
    assert by_id["copy"]["kind"] == "EXACT_DUPLICATE" and by_id["copy"]["duplicate_of"] == "first"
    assert by_id["copy"]["cluster_id"] == by_id["first"]["cluster_id"] == "first"
    assert "first" in [n["item_id"] for n in by_id["copy"]["neighbours"]]
    assert main(["decisions", "--kafka", stack.kafka_bootstrap, "--tenant", tenant,
                 "--kind", "EXACT_DUPLICATE"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "default/copy  EXACT_DUPLICATE" in lines[0]
    assert "cluster first" in lines[0] and "neighbours [first 1.000" in lines[0]
    assert main(["decisions", "--kafka", stack.kafka_bootstrap, "--tenant", tenant + "x"]) == 0
    assert capsys.readouterr().out == "", "other tenants' decisions stay out"
