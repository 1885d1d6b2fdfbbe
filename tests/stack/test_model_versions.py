"""A new model version fills its own collection beside the live one, then an alias switch
makes it live while queries keep running; the two versions' vectors never meet."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stack_helpers import first, read_decisions, record, start_stack
from twinstream.cli import main as cli_main
from twinstream.common.vectorstore import VectorStore, decode_decision
from twinstream.devstack import LocalStack
from twinstream.v1 import items_pb2

pytestmark = pytest.mark.stack

TENANT = "versions"


@pytest.fixture(scope="module")
def two_version_stack(base_bundle: Path, version_two: Path) -> Iterator[LocalStack]:
    running = start_stack(base_bundle, "versions", prometheus=False,
                          bundles=[base_bundle, version_two], embedding_bundles=[base_bundle])
    yield running
    running.stop()


def test_reembed_then_switch_with_queries_running(two_version_stack: LocalStack,
                                                  version_two: Path) -> None:
    stack = two_version_stack
    ids = [f"v{i}" for i in range(30)]
    with stack.client() as client:
        client.ingest_many([record(item_id, {"given_name": f"n{n % 10}", "surname": "version",
                                             "postcode": str(2000 + n % 10)}, TENANT)
                            for n, item_id in enumerate(ids)])
        decisions = first(read_decisions(stack, ids, TENANT))
        assert {d.model.version for d in decisions.values()} == {"1"}

        seen: list[str] = []
        errors: list[grpc.RpcError] = []
        stop = threading.Event()

        def query() -> None:
            while not stop.is_set():
                try:
                    seen.append(client.match(TENANT, item_id="v0", k=3).model.version)
                except grpc.RpcError as error:
                    errors.append(error)
                time.sleep(0.05)

        worker = threading.Thread(target=query)
        worker.start()
        try:
            stack.start_reembed(version_two)
            store = VectorStore(stack.milvus_uri)
            v2 = store.collection_name(items_pb2.ModelRef(name="twinstream_text", version="2"))
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if store.client.has_collection(v2) and store.count(v2, f'tenant == "{TENANT}"') == 30:
                    break
                time.sleep(0.5)
            assert store.count(v2, f'tenant == "{TENANT}"') == 30, "the re-embed job filled v2"
            assert set(seen) == {"1"}, "v1 serves until the switch"
            assert cli_main(["promote", "--model", "twinstream_text", "--version", "2",
                             "--milvus-uri", stack.milvus_uri]) == 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not seen or seen[-1] != "2"):
                time.sleep(0.1)
        finally:
            stop.set()
            worker.join()
    assert not errors, [e.details() for e in errors]
    switch = seen.index("2")
    assert set(seen[:switch]) == {"1"} and set(seen[switch:]) == {"2"}, "one clean switch"
    for row in store.query(v2, f'tenant == "{TENANT}"', ["decision"]):
        decision = decode_decision(row["decision"])
        assert decision.model.version == "2", "v2 rows were decided among v2 vectors only"
    published = read_decisions(stack, ids, TENANT)
    assert all(c.model.version == "1" for copies in published.values() for c in copies), (
        "back-filling publishes no second decision")
