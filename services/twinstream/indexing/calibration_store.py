"""Where the indexer keeps each tenant/collection's calibration state between batches and restarts.

One small Milvus collection (``<prefix>_calibration``) next to the item collections, one row per
model version and tenant/collection: cosine similarities mean something only for one encoder,
so a re-embed to a new version starts its own calibration. Only the indexer that owns the
scope's partition writes its row (one writer per scope).
"""

from __future__ import annotations

import logging

from pymilvus import DataType

from twinstream.common.vectorstore import VectorStore
from twinstream.indexing.calibration import CollectionState

log = logging.getLogger(__name__)
_STATE_CHARS = 65535


class CalibrationStore:
    def __init__(self, store: VectorStore) -> None:
        self.client = store.client
        self.name = f"{store.prefix}_calibration"
        self._ready = False
        # The state as last read or written, per key: this indexer is the scope's only writer
        # while it owns the partition, so Milvus holds nothing newer until a rebalance (forget).
        self._saved: dict[str, str] = {}

    def forget(self) -> None:
        """Drop the cached states (the partitions owned changed; another indexer may write)."""
        self._saved.clear()

    def _ensure(self) -> None:
        if self._ready:
            return
        if not self.client.has_collection(self.name):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=640)
            schema.add_field("state", DataType.VARCHAR, max_length=_STATE_CHARS)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs one; unused
            index = self.client.prepare_index_params()
            index.add_index("vector", index_type="FLAT", metric_type="L2")
            self.client.create_collection(self.name, schema=schema, index_params=index,
                                          consistency_level="Strong")
            log.info("created collection", extra={"collection": self.name})
        self._ready = True

    @staticmethod
    def key(collection: str, tenant: str, scope_collection: str) -> str:
        return f"{collection}/{tenant}/{scope_collection}"

    def load(self, key: str) -> CollectionState:
        """The scope's state; a fresh (warm-up) one when it has none yet."""
        if key not in self._saved:
            self._ensure()
            rows = self.client.get(self.name, ids=[key], output_fields=["state"])
            if not rows:
                return CollectionState()
            self._saved[key] = str(rows[0]["state"])
        # A fresh copy each time: a failed batch's observations never reach its retry.
        return CollectionState.from_json(self._saved[key])

    def save(self, key: str, state: CollectionState) -> None:
        self._ensure()
        text = state.to_json()
        self._saved.pop(key, None)  # unknown until Milvus answers
        self.client.upsert(self.name, [{"pk": key, "state": text, "vector": [0.0, 0.0]}])
        self._saved[key] = text
