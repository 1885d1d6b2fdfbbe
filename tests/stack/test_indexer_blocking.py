"""Blocking keys through the real indexer, on Milvus Lite and on the Milvus 2.3 server: a record's
earlier duplicate that the cosine top-k misses is read back by a shared key
(``json_contains_any`` over the row's signals) and decided as its duplicate."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_indexer_calibration import decide_all, embedded
from unit.indexing.test_decide import BUNDLE

from twinstream.common.config import MilvusSettings, SearchSettings, Settings
from twinstream.common.vectorstore import SIGNALS, VectorStore
from twinstream.devstack import running_milvus
from twinstream.indexing import service
from twinstream.indexing.blocking import KEYS, KEYS_PER_QUERY, blocking_keys
from twinstream.indexing.service import Indexer
from twinstream.v1 import decisions_pb2, items_pb2

pytestmark = pytest.mark.stack

DIM = 16
NEIGHBOURS = 3
ORIGINAL = {"given_name": "anna", "surname": "meier", "suburb": "bern", "postcode": "3011", "street": "lindenweg"}


@contextlib.contextmanager
def milvus(kind: str, root: Path) -> Iterator[str]:
    if kind == "lite":
        yield str(root / "milvus.db")
    else:
        with running_milvus(root / "milvus") as (uri, _):
            yield uri


def axis(k: int, tilt: float = 0.0) -> np.ndarray:
    vector = np.zeros(DIM)
    vector[k] = 1.0
    vector[(k + 1) % DIM] = tilt
    return vector


@pytest.mark.parametrize(("kind", "keyed", "keys_per_query"),
                         [("lite", True, KEYS_PER_QUERY), ("server", True, KEYS_PER_QUERY), ("lite", True, 4),
                          ("lite", False, KEYS_PER_QUERY)])
def test_an_earlier_duplicate_outside_the_cosine_top_k_is_found_by_a_shared_key(
        kind: str, keyed: bool, keys_per_query: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "KEYS_PER_QUERY", keys_per_query)  # 4: the keys read in several queries
    # the original far from its copy in cosine; decoys of other fields all around the copy
    first = [("orig", ORIGINAL, axis(0))]
    first += [(f"decoy{n}", {"given_name": f"bob{n}", "surname": f"smith{n}", "suburb": f"town{n}",
                             "postcode": f"{4000 + n}", "street": f"road {n}"}, axis(5, 0.05 * n))
              for n in range(NEIGHBOURS + 2)]
    copy = dict(ORIGINAL, surname="meyer")
    messages = [embedded(i, "people", items_pb2.RECORD, json.dumps(f).encode(), v, n, ood_score=0.1)
                for n, (i, f, v) in enumerate(first)]
    later = embedded("copy", "people", items_pb2.RECORD, json.dumps(copy).encode(), axis(5, 0.01), len(first),
                     ood_score=0.1)
    with milvus(kind, tmp_path) as uri:
        settings = Settings(service="indexing", milvus=MilvusSettings(uri=uri, flush_rows=0),
                            search=SearchSettings(neighbours=NEIGHBOURS, keyed_reads=keyed))
        store = VectorStore(uri, index_type="FLAT")
        indexer = Indexer(settings, store, [BUNDLE])
        assert decide_all(indexer, messages)[0].kind == decisions_pb2.NOVEL  # the original
        (decision,) = decide_all(indexer, [later])  # a batch of its own: the original is read from Milvus
        reads = indexer.metrics.registry.get_sample_value("twinstream_indexing_keyed_read_seconds_count")
        assert reads == (2 if keyed else 0)  # one read a batch
        if not keyed:  # TWINSTREAM_KEYED_READS=false: the cosine neighbours alone, which miss it
            assert decision.duplicate_of != "orig"
            return
        assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "orig"
        assert decision.cluster_id == "orig"
        # the explanation lists it, last, beyond the cosine top k
        assert [n.item_id for n in decision.neighbours][NEIGHBOURS:] == ["orig"]
        collection = store.collections()[0]
        row = store.get(collection, ["t/people/copy"], ["pk", SIGNALS])["t/people/copy"]
        assert row[SIGNALS][KEYS] == blocking_keys({"fields": copy})
        store.client.close()
