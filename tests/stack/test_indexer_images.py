"""Images through the real indexer over Milvus Lite (embedded, no stack): their perceptual hashes
are stored with the row and compared with later images' (docs/calibration.md, images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from test_indexer_calibration import decide_all, embedded, indexer_on
from unit.indexing.test_image_signals import jpeg, picture

from twinstream.indexing.calibration import PRIOR_DUPLICATE
from twinstream.v1 import decisions_pb2, items_pb2

pytestmark = pytest.mark.stack


def image_message(item_id: str, content: bytes, vector: np.ndarray, at: int) -> ConsumerRecord:
    return embedded(item_id, "photos", items_pb2.IMAGE, content, vector, at, ood_score=0.1)


def test_a_recompressed_copy_is_linked_by_its_stored_phash_though_the_cosine_alone_would_not(tmp_path: Path) -> None:
    original = np.array([1.0] + [0.0] * 15)
    copy = np.array([1.0, 1.0] + [0.0] * 14)  # cosine 0.71: a match at most by the bundle's thresholds
    other = np.array([1.0, 0.0, 1.2] + [0.0] * 13)
    indexer = indexer_on(str(tmp_path / "milvus.db"))
    first = decide_all(indexer, [image_message("a", jpeg(picture(1)), original, 0),
                                 image_message("b", jpeg(picture(2)), other, 1)])
    assert [d.kind for d in first] == [decisions_pb2.NOVEL, decisions_pb2.NOVEL]
    out = decide_all(indexer, [image_message("a-copy", jpeg(picture(1), quality=40), copy, 2)])  # a later batch
    assert out[0].kind == decisions_pb2.NEAR_DUPLICATE and out[0].duplicate_of == "a"
    assert out[0].duplicate_probability == pytest.approx(PRIOR_DUPLICATE) and out[0].cluster_id == "a"
    assert {n.item_id: n.comparison for n in out[0].neighbours}["a"][1:] == "00"  # pHash, dHash agree
