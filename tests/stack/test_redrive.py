"""An item embedded by a model version indexing does not have goes to items.dlq with reason
``unknown_model_version``; once the version is deployed, ``twinstream dlq redrive`` sends the
letter's untouched bytes back to items.embedded and the item is decided once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack_helpers import read_decisions, record, start_stack
from twinstream.cli import main as cli_main
from twinstream.common.vectorstore import VectorStore
from twinstream.devstack import LocalStack
from twinstream.dlq import read_letters, select
from twinstream.v1 import items_pb2

pytestmark = pytest.mark.stack

TENANT = "redrive"
IDS = ["r0", "r1", "r2"]
REASON = "unknown_model_version"


@pytest.fixture(scope="module")
def embedding_ahead(base_bundle: Path, version_two: Path) -> Iterator[LocalStack]:
    """Embedding runs version 2 while indexing has only version 1 (a deploy in the wrong order).
    In-process encoders: Triton would need the version too, and is not what this tests."""
    running = start_stack(base_bundle, "redrive", prometheus=False, encoder_backend="inprocess",
                          embedding_bundles=[version_two])
    yield running
    running.stop()


def letters_of_tenant(stack: LocalStack, count: int, timeout_s: float = 120.0) -> list[items_pb2.DeadLetter]:
    settings = stack.settings()
    deadline = time.monotonic() + timeout_s
    while True:
        chosen = select(read_letters(settings), settings, REASON, TENANT).letters
        if len(chosen) >= count or time.monotonic() > deadline:
            return chosen
        time.sleep(1.0)


def redrive(stack: LocalStack, *extra: str) -> int:
    return cli_main(["dlq", "redrive", "--reason", REASON, "--tenant", TENANT,
                     "--kafka", stack.kafka_bootstrap, *extra])


def test_an_unknown_model_version_is_dead_lettered_then_redriven_and_decided_once(
        embedding_ahead: LocalStack, base_bundle: Path, version_two: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    stack = embedding_ahead
    with stack.client() as client:
        client.ingest_many([record(item_id, {"given_name": f"name{n}", "surname": "redrive",
                                             "postcode": str(3000 + n)}, TENANT)
                            for n, item_id in enumerate(IDS)])
    letters = letters_of_tenant(stack, len(IDS))
    assert sorted(letter.item_id for letter in letters) == IDS
    assert {(letter.stage, letter.source_topic) for letter in letters} == {("indexing", "items.embedded")}
    assert all("twinstream_text:2" in letter.detail for letter in letters)

    assert redrive(stack, "--dry-run") == 0
    assert f"would re-drive {len(IDS)} letters" in capsys.readouterr().out

    # Deploy version 2 to indexing, then re-drive.
    stack.config.bundles = [base_bundle, version_two]
    stack.stop_service("indexing")
    stack.start_service("indexing")
    assert redrive(stack) == 0
    assert f"re-drove {len(IDS)} letters" in capsys.readouterr().out
    decisions = read_decisions(stack, IDS, TENANT)
    assert {d.model.version for copies in decisions.values() for d in copies} == {"2"}

    for item_id, copies in decisions.items():
        assert len({c.SerializeToString() for c in copies}) == 1, f"{item_id} decided differently"

    # A second re-drive repeats the stored decisions byte for byte and adds no row.
    assert redrive(stack) == 0
    deadline = time.monotonic() + 120
    again = read_decisions(stack, IDS, TENANT)
    while min(len(c) for c in again.values()) < 2 and time.monotonic() < deadline:
        again = read_decisions(stack, IDS, TENANT)
    assert min(len(c) for c in again.values()) >= 2, "the re-driven items were processed again"
    for item_id, copies in again.items():
        assert len({c.SerializeToString() for c in copies}) == 1, f"{item_id} decided differently"
    store = VectorStore(stack.milvus_uri)
    try:
        v2 = store.collection_name(items_pb2.ModelRef(name="twinstream_text", version="2"))
        rows = store.query(v2, f'tenant == "{TENANT}"', ["pk"])
    finally:
        store.client.close()
    assert sorted(str(r["pk"]).rsplit("/", 1)[1] for r in rows) == IDS, "one row per item"
