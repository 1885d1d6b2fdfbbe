"""Milvus access shared by indexing (writes) and matching (reads): one code path for an
embedded Milvus Lite folder (``var/milvus.db``) and a Milvus server URI (``http://host:19530``).

One collection per model version (``<prefix>_<model>_v<version>``) so vectors of two versions
are never compared; the alias ``<prefix>_<model>`` names the version that serves queries.
Rows are keyed by ``<tenant>/<collection>/<item_id>``, which makes every write idempotent.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient

from twinstream.v1 import decisions_pb2, items_pb2

log = logging.getLogger(__name__)

OUTPUT_FIELDS = ["pk", "item_id", "tenant", "collection", "content_hash", "cluster_id",
                 "ingest_ms", "event_ms", "metadata", "decision", "deleted_ms"]
# Deleted rows stay as tombstones (deleted_ms > 0) so a replayed message cannot bring them back;
# every read path filters on this, and a reaper removes tombstones past the replay horizon.
LIVE = "deleted_ms == 0"
# Consistency, chosen per call (docs/design.md, "Consistency"). A decision must see every row
# written before it, also rows another indexer wrote before a rebalance handed it the partition,
# so the indexer reads Strong (Session would cover only this client's own writes). Gets and
# queries use the collection's level, Strong. A Match may miss writes younger than Milvus'
# common.gracefulTime (150 ms on the local stack) and skips waiting for the next time tick.
DECIDE_CONSISTENCY = "Strong"
MATCH_CONSISTENCY = "Bounded"
# HNSW: M16/efConstruction 200 at build; ef 128 at search unless a caller asks otherwise:
# on 200k x 384 clustered vectors ef 64 gave recall@10 0.91, ef 128 0.985 at about the same
# latency (docs/faults.md, "Match at scale").
HNSW_BUILD = {"M": 16, "efConstruction": 200}
DEFAULT_EF = 128
_SAFE = re.compile(r"[^a-z0-9_]")


def row_key(tenant: str, collection: str, item_id: str) -> str:
    return f"{tenant}/{collection}/{item_id}"


def quote(value: str) -> str:
    """A Milvus string literal (JSON escaping is a subset Milvus accepts)."""
    return json.dumps(value)


def scope_filter(tenant: str, collection: str, ttl_s: int = 0, now_ms: int | None = None) -> str:
    """Live rows of one tenant/collection (not deleted; not expired when the scope has a TTL)."""
    expr = f"tenant == {quote(tenant)} and collection == {quote(collection)} and {LIVE}"
    if ttl_s > 0:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        expr += f" and ingest_ms >= {now - ttl_s * 1000}"
    return expr


def encode_decision(decision: decisions_pb2.Decision) -> str:
    return base64.b64encode(decision.SerializeToString()).decode()


def decode_decision(text: str) -> decisions_pb2.Decision:
    decision = decisions_pb2.Decision()
    if text:
        decision.ParseFromString(base64.b64decode(text))
    return decision


@dataclass(frozen=True)
class Hit:
    """A search result with its stored fields."""

    pk: str
    score: float
    fields: dict[str, Any]


class VectorStore:
    """A thin, typed layer over MilvusClient for twinstream's schema."""

    def __init__(self, uri: str, token: str = "", prefix: str = "twinstream",
                 index_type: str = "HNSW", ef: int = DEFAULT_EF) -> None:
        # pymilvus pings every 10 s, even idle; gRPC servers built on grpcio (Milvus Lite's) answer
        # pings more often than every 5 min without traffic with GOAWAY "too_many_pings".
        options = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}
        extra: dict[str, Any] = {"token": token} if token else {}
        self.client = MilvusClient(uri=uri, grpc_options=options, **extra)
        self.prefix = prefix
        self.index_type = index_type
        self.ef = ef
        self._known: set[str] = set()
        self._live_cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    # -- names -----------------------------------------------------------------------------
    def collection_name(self, model: items_pb2.ModelRef) -> str:
        return f"{self.prefix}_{_SAFE.sub('_', model.name.lower())}_v{_SAFE.sub('_', model.version)}"

    def alias_name(self, model_name: str) -> str:
        return f"{self.prefix}_{_SAFE.sub('_', model_name.lower())}"

    # -- schema ----------------------------------------------------------------------------
    def ensure_collection(self, model: items_pb2.ModelRef, dim: int, make_live: bool = True) -> str:
        """Create the model version's collection if needed; point the alias at it if unset."""
        name = self.collection_name(model)
        with self._lock:
            if name in self._known:
                return name
            if not self.client.has_collection(name):
                self._create(name, dim)
            alias = self.alias_name(model.name)
            if make_live and alias not in self.client.list_aliases(name).get("aliases", []):
                try:
                    self.client.describe_alias(alias)
                except Exception:  # no such alias yet: the first version becomes live
                    self.client.create_alias(name, alias)
            self._known.add(name)
            return name

    def _create(self, name: str, dim: int) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=640)
        schema.add_field("item_id", DataType.VARCHAR, max_length=256)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64)
        schema.add_field("collection", DataType.VARCHAR, max_length=64)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("cluster_id", DataType.VARCHAR, max_length=256)
        schema.add_field("ingest_ms", DataType.INT64)
        schema.add_field("event_ms", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("decision", DataType.VARCHAR, max_length=65535)
        schema.add_field("deleted_ms", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        index = self.client.prepare_index_params()
        params = HNSW_BUILD if self.index_type == "HNSW" else {}
        index.add_index("vector", index_type=self.index_type, metric_type="COSINE", params=params)
        self.client.create_collection(name, schema=schema, index_params=index,
                                      consistency_level=DECIDE_CONSISTENCY)
        log.info("created collection", extra={"collection": name, "dim": dim})

    def switch_alias(self, model_name: str, target: str) -> None:
        """Make ``target`` the live collection for ``model_name`` (atomic in Milvus)."""
        alias = self.alias_name(model_name)
        try:
            self.client.describe_alias(alias)
            self.client.alter_alias(target, alias)
        except Exception:
            self.client.create_alias(target, alias)

    def exists(self, name: str) -> bool:
        """Whether a collection or an alias of that name exists."""
        if self.client.has_collection(name):
            return True
        try:
            self.client.describe_alias(name)
        except Exception:  # pymilvus raises when the alias does not exist
            return False
        return True

    def live_collection(self, model_name: str) -> str:
        return str(self.client.describe_alias(self.alias_name(model_name))["collection_name"])

    def is_live(self, model: items_pb2.ModelRef, max_age_s: float = 2.0) -> bool:
        """Whether ``model``'s version is the one its alias serves (cached for ``max_age_s``)."""
        now = time.monotonic()
        cached = self._live_cache.get(model.name)
        if cached is None or now - cached[1] > max_age_s:
            live = self.live_collection(model.name) if self.exists(self.alias_name(model.name)) else ""
            cached = (live, now)
            self._live_cache[model.name] = cached
        return cached[0] == self.collection_name(model)

    # -- writes ----------------------------------------------------------------------------
    def upsert(self, collection: str, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self.client.upsert(collection, list(rows))

    def tombstone(self, collection: str, pks: Sequence[str], now_ms: int) -> int:
        """Mark rows deleted (idempotent); returns how many live rows were marked."""
        rows = [r for r in self.get(collection, pks, [*OUTPUT_FIELDS, "vector"]).values()
                if not r["deleted_ms"]]
        for row in rows:
            row["deleted_ms"] = now_ms
        self.upsert(collection, rows)
        return len(rows)

    def relabel_clusters(self, collection: str, scope: str, losers: Sequence[str],
                         winner: str) -> int:
        """Move every row of the ``losers`` clusters into ``winner`` (idempotent)."""
        if not losers:
            return 0
        listed = ", ".join(quote(c) for c in losers)
        rows = self.query(collection, f"{scope} and cluster_id in [{listed}]",
                          [*OUTPUT_FIELDS, "vector"])
        for row in rows:
            row["cluster_id"] = winner
        self.upsert(collection, rows)
        return len(rows)

    def purge(self, collection: str, expr: str) -> int:
        """Hard-delete rows matching ``expr`` (the reaper: old tombstones, expired items)."""
        pks = [r["pk"] for r in self.query(collection, expr, ["pk"])]
        if pks:
            self.client.delete(collection, ids=pks)
        return len(pks)

    def flush(self, collection: str) -> None:
        self.client.flush(collection)

    # -- reads -----------------------------------------------------------------------------
    def get(self, collection: str, pks: Sequence[str],
            fields: Sequence[str] = OUTPUT_FIELDS) -> dict[str, dict[str, Any]]:
        if not pks:
            return {}
        rows = self.client.get(collection, ids=list(pks), output_fields=list(fields))
        return {str(row["pk"]): dict(row) for row in rows}

    def query(self, collection: str, expr: str, fields: Sequence[str] = OUTPUT_FIELDS,
              limit: int = 16384) -> list[dict[str, Any]]:
        return [dict(r) for r in self.client.query(collection, filter=expr,
                                                   output_fields=list(fields), limit=limit)]

    def count(self, collection: str, expr: str = "") -> int:
        rows = self.client.query(collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def search(self, collection: str, vectors: Sequence[Sequence[float]] | np.ndarray, limit: int,
               expr: str,
               fields: Iterable[str] = ("item_id", "cluster_id", "content_hash", "ingest_ms"),
               min_score: float | None = None, consistency: str = DECIDE_CONSISTENCY,
               offset: int = 0, ef: int | None = None) -> list[list[Hit]]:
        # HNSW needs ef >= the number of results it returns (offset + limit).
        ef = max(ef or self.ef, offset + limit)
        params: dict[str, Any] = {"metric_type": "COSINE", "params": {"ef": ef}}
        if min_score is not None:
            params["params"].update({"radius": float(min_score), "range_filter": 1.0001})
        results = self.client.search(
            collection, data=[list(map(float, v)) for v in vectors], limit=limit, filter=expr,
            output_fields=list(fields), search_params=params, consistency_level=consistency,
            offset=offset,
        )
        return [[_hit(h) for h in hits] for hits in results]


def _hit(raw: Any) -> Hit:
    """pymilvus names the key of a hit "id" (server) or after the primary field (Milvus Lite)."""
    keys = raw.keys() if hasattr(raw, "keys") else ()
    pk = raw["pk"] if "pk" in keys else raw["id"]
    return Hit(str(pk), float(raw["distance"]), dict(raw["entity"]))
