"""The indexer's per-collection calibration over a real Milvus Lite (embedded, no stack):
fitted from the collection's own records, persisted, and carried on across a restart."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from unit.indexing.test_decide import BUNDLE

from twinstream.common.config import Settings
from twinstream.common.vectorstore import VectorStore
from twinstream.indexing.service import Indexer
from twinstream.v1 import decisions_pb2, items_pb2

pytestmark = pytest.mark.stack

DIM = 16
NAMES = ["anna", "bruno", "carla", "dieter", "emma", "fritz", "greta", "hans", "ines", "jonas"]


def records(entities: int, seed: int = 3) -> list[tuple[str, str, dict[str, str], np.ndarray]]:
    """(item id, entity, fields, vector): each entity once, a third of them again with a typo;
    vectors close for copies and, as with a real encoder, fairly close for everyone."""
    rng = random.Random(seed)
    common = np.ones(DIM)
    out = []
    for e in range(entities):
        fields = {"given_name": rng.choice(NAMES), "surname": f"{rng.choice(NAMES)}son{e}",
                  "postcode": str(rng.randint(1000, 9999)),
                  "date_of_birth": f"19{rng.randint(10, 99)}0{rng.randint(1, 9)}1{e % 10}"}
        base = common + np.array([rng.gauss(0, 0.6) for _ in range(DIM)])
        out.append((f"e{e}-o", f"e{e}", fields, base))
        if e % 3 == 0:
            copy = dict(fields, surname=fields["surname"][:-1] + "x" + fields["surname"][-1])
            out.append((f"e{e}-c", f"e{e}", copy, base + np.array([rng.gauss(0, 0.1) for _ in range(DIM)])))
    rng.shuffle(out)
    return out


def message(item_id: str, fields: dict[str, str], vector: np.ndarray, at: int) -> ConsumerRecord:
    return embedded(item_id, "people", items_pb2.RECORD, json.dumps(fields).encode(), vector, at, ood_score=0.9)


def embedded(item_id: str, collection: str, modality: items_pb2.Modality.ValueType, content: bytes,
             vector: np.ndarray, at: int, ood_score: float) -> ConsumerRecord:
    """An embedded item of tenant "t" as indexing polls it: offset ``at`` on one partition,
    stamped when it was produced."""
    item = items_pb2.EmbeddedItem(
        accepted=items_pb2.AcceptedItem(
            item=items_pb2.Item(item_id=item_id, tenant="t", collection=collection, modality=modality,
                                content=content),
            content_hash=f"h-{item_id}", ingest_time_ms=at),
        vector=list(vector / np.linalg.norm(vector)), model=BUNDLE.model_ref, ood_score=ood_score)
    value, key = item.SerializeToString(), f"t/{collection}".encode()
    return ConsumerRecord("items.embedded", 0, 0, at, 1_700_000_000_000 + at, 0, key, value, [],
                          None, len(key), len(value), -1)


def decide_all(indexer: Indexer, messages: list[Any], batch: int = 25) -> list[decisions_pb2.Decision]:
    out = []
    for start in range(0, len(messages), batch):
        result = indexer(messages[start:start + batch])
        assert not result.rejected
        for outgoing in result.outputs:
            decision = decisions_pb2.Decision()
            decision.ParseFromString(outgoing.value)
            out.append(decision)
    return out


@pytest.fixture
def milvus_file(tmp_path: Path) -> str:
    return str(tmp_path / "milvus.db")


def indexer_on(path: str) -> Indexer:
    settings = Settings(service="indexing", milvus={"uri": path, "flush_rows": 0})
    return Indexer(settings, VectorStore(path, index_type="FLAT"), [BUNDLE])


def test_a_collection_calibrates_itself_and_keeps_its_calibration_across_a_restart(milvus_file: str) -> None:
    rows = records(120)
    messages = [message(i, f, v, n) for n, (i, _, f, v) in enumerate(rows)]
    first = indexer_on(milvus_file)
    decisions = decide_all(first, messages[:150])
    # the bundle's detector calls every item OOD (0.9 > 0.5): the collection does not
    assert not any(d.kind == decisions_pb2.OUT_OF_DISTRIBUTION for d in decisions)
    assert decisions[0].calibration.version == 0
    assert decisions[-1].calibration.version >= 2  # fitted at 50 and 100 items
    assert decisions[-1].calibration.record_fields  # the field model decides records
    version = decisions[-1].calibration.version
    first.store.client.close()

    again = indexer_on(milvus_file)
    replayed = decide_all(again, messages[100:150])  # already decided: stored decisions, byte for byte
    assert [d.SerializeToString() for d in replayed] == [d.SerializeToString() for d in decisions[100:150]]
    rest = decide_all(again, messages[150:])
    assert rest[0].calibration.version >= version  # carried on, not a new warm-up
    # once the field model decides, its duplicate calls are right and find most copies
    entity = {i: e for i, e, _, _ in rows}
    fitted = [d for d in decisions + rest if d.calibration.record_fields]
    said = [d for d in fitted if d.kind == decisions_pb2.NEAR_DUPLICATE]
    copies = [d for d in fitted if any(e == entity[d.item_id] for e in (entity[n.item_id] for n in d.neighbours))]
    assert said and all(entity[d.duplicate_of] == entity[d.item_id] for d in said)
    assert len(said) >= 0.8 * len(copies)
