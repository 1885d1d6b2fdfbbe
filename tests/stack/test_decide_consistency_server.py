"""On the Milvus server (where consistency levels are real, unlike Milvus Lite): the indexer's
Session reads after its own writes decide exactly as Strong reads with the calibration state
read back every batch, batch after batch, and a successor indexer (another client) sees what
its predecessor wrote (docs/store.md, "Read consistency (indexer)")."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_indexer_calibration import message, records
from unit.indexing.test_decide import BUNDLE

from twinstream.common.config import Settings
from twinstream.common.vectorstore import VectorStore
from twinstream.devstack import running_milvus
from twinstream.indexing.service import Indexer
from twinstream.v1 import decisions_pb2

pytestmark = pytest.mark.stack


def decide(uri: str, prefix: str, messages: list, strong: bool) -> list[bytes]:
    settings = Settings(service="indexing", milvus={"uri": uri, "collection_prefix": prefix},
                        search={"decide_session_reads": not strong})
    indexer = Indexer(settings, VectorStore(uri, prefix=prefix), [BUNDLE])
    out: list[bytes] = []
    for start in range(0, len(messages), 20):
        if strong:
            indexer.calibrations.forget()
        out += [o.value for o in indexer(messages[start:start + 20]).outputs]
    indexer.store.client.close()
    return out


def test_session_reads_decide_as_strong_reads_and_a_successor_sees_its_predecessors_rows(
        tmp_path: Path) -> None:
    messages = [message(i, f, v, n) for n, (i, _, f, v) in enumerate(records(60))]
    with running_milvus(tmp_path / "milvus") as (uri, _):
        session = decide(uri, "sess", messages, strong=False)
        strong = decide(uri, "strong", messages, strong=True)
        assert len(session) == len(messages)
        assert session == strong
        # a successor on the same collection: every item is already stored, so every decision
        # is the stored one, byte for byte (it saw all of its predecessor's rows)
        replayed = decide(uri, "sess", messages, strong=False)
        assert replayed == session
        kinds = {decisions_pb2.Decision.FromString(v).kind for v in session}
        assert decisions_pb2.NEAR_DUPLICATE in kinds or decisions_pb2.EXACT_DUPLICATE in kinds
