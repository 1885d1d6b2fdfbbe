"""Milvus access shared by indexing (writes) and matching (reads): one code path for an
embedded Milvus Lite folder (``var/milvus.db``) and a Milvus server URI (``http://host:19530``).

One collection per model version (``<prefix>_<model>_v<version>``) so vectors of two versions
are never compared; the alias ``<prefix>_<model>`` names the version that serves queries.
Rows are keyed by ``<tenant>/<collection>/<item_id>``, which makes every write idempotent.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from twinstream.common.errors import guarded, milvus_transient
from twinstream.common.metrics import Metrics
from twinstream.v1 import decisions_pb2, items_pb2

log = logging.getLogger(__name__)

OUTPUT_FIELDS = ["pk", "item_id", "tenant", "collection", "content_hash", "cluster_id",
                 "ingest_ms", "event_ms", "metadata", "decision", "deleted_ms"]
# Deleted rows stay as tombstones (deleted_ms > 0) so a replayed message cannot bring them back;
# every read path filters on this, and a reaper removes tombstones past the replay horizon.
LIVE = "deleted_ms == 0"
# What the indexer's per-collection calibration compares an item on, beside its vector (a
# record's fields); nullable: collections made before it have no such field and do without.
SIGNALS = "signals"
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
# Milvus status codes: the collection (or alias) does not exist / exists but is not loaded.
_NOT_FOUND, _NOT_LOADED = 100, 101
# The most rows one Milvus query (offset + limit) returns.
QUERY_CAP = 16384
T = TypeVar("T")


def row_key(tenant: str, collection: str, item_id: str) -> str:
    """The primary key. Ids may contain ``/`` but tenants and collections never do
    (``common/names.py``), so the first two ``/`` split a key back unambiguously."""
    return f"{tenant}/{collection}/{item_id}"


# The only escapes both Milvus Lite's and the Milvus server's expression parsers accept; JSON's
# "\u00fc" is refused ("unknown escape sequence"), raw UTF-8 is not, and a raw newline or
# carriage return would end the literal.
_LITERAL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def quote(value: str) -> str:
    """A Milvus string literal for any text: raw UTF-8, with only \\, ", newline and CR escaped."""
    return '"' + value.translate(_LITERAL_ESCAPES) + '"'


def pk_filter(pks: Iterable[str]) -> str:
    """Rows with these primary keys. pymilvus' own ``get``/``delete(ids=...)`` paste keys into
    single quotes unescaped: a key holding ``'`` or ``\\`` breaks the expression or, worse,
    selects another tenant's row; ids may hold both, so keys are always quoted here."""
    return f"pk in [{', '.join(quote(pk) for pk in pks)}]"


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
                 index_type: str = "HNSW", ef: int = DEFAULT_EF, metrics: Metrics | None = None,
                 connection: Mapping[str, Any] | None = None) -> None:
        self.metrics = metrics or Metrics.unexported()
        # pymilvus pings every 10 s, even idle; gRPC servers built on grpcio (Milvus Lite's) answer
        # pings more often than every 5 min without traffic with GOAWAY "too_many_pings".
        options = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}
        # ``connection``: credentials and TLS (``security.milvus_client_options``)
        extra: dict[str, Any] = {"token": token} if token else {}
        extra.update(connection or {})
        # Unavailable-server errors become TransientError on every call (common/errors.py).
        self.client = guarded(MilvusClient(uri=uri, grpc_options=options, **extra),
                              milvus_transient, "Milvus")
        self.prefix = prefix
        self.index_type = index_type
        self.ef = ef
        self._known: set[str] = set()
        self._live_cache: dict[str, tuple[str, float]] = {}
        self._signals: dict[str, bool] = {}
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
        schema.add_field(SIGNALS, DataType.JSON, nullable=True)
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

    def collections(self) -> list[str]:
        """Every item collection of this prefix (one per model version, named as
        ``collection_name`` makes them; not the indexer's ``<prefix>_calibration``)."""
        versioned = re.compile(rf"{re.escape(self.prefix)}_[a-z0-9_]+_v[a-z0-9_]+")
        return [c for c in self.client.list_collections() if versioned.fullmatch(c)]

    def _loaded(self, collection: str, call: Callable[[], T]) -> T:
        """Run a read, loading the collection first if Milvus says it is not loaded.

        A restarted Milvus server comes back with its collections released; nothing else would
        load them again, so every read path recovers here without an operator.
        """
        try:
            return call()
        except MilvusException as exc:
            if exc.code != _NOT_LOADED and "not loaded" not in str(exc.message):
                if exc.code == _NOT_FOUND:  # dropped or lost: let ensure_collection check again
                    self._known.discard(collection)
                raise
        log.warning("collection not loaded; loading it", extra={"collection": collection})
        self.client.load_collection(collection)
        return call()

    def has_signals(self, collection: str) -> bool:
        """Whether the collection stores ``SIGNALS`` (not one made before they existed)."""
        if collection not in self._signals:
            described = self.client.describe_collection(collection)
            self._signals[collection] = SIGNALS in {f["name"] for f in described["fields"]}
        return self._signals[collection]

    def _whole_row(self, collection: str) -> list[str]:
        """Every stored field, for read-modify-write (tombstones, relabels)."""
        return [*OUTPUT_FIELDS, "vector", *([SIGNALS] if self.has_signals(collection) else [])]

    # -- writes ----------------------------------------------------------------------------
    # Only the indexer that owns a scope's partition writes its rows (inserts, merges, deletes,
    # expiry and purges all arrive on that partition), so these read-modify-writes never race.
    def upsert(self, collection: str, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        if not self.has_signals(collection):
            rows = [{k: v for k, v in row.items() if k != SIGNALS} for row in rows]
        else:  # Milvus before 2.5 ignores nullable: a row without signals gets the empty object
            rows = [{SIGNALS: {}, **row} if row.get(SIGNALS) is None else row for row in rows]
        try:
            self.client.upsert(collection, list(rows))
        except MilvusException as exc:
            if exc.code == _NOT_FOUND:
                self._known.discard(collection)
            raise

    def tombstone(self, collection: str, pks: Sequence[str], now_ms: int,
                  ingested_before_ms: int | None = None) -> int:
        """Mark live rows deleted at ``now_ms`` (idempotent); with ``ingested_before_ms`` only rows
        ingested before it (TTL expiry re-checked where it is applied). Returns how many."""
        rows = [r for r in self.get(collection, pks, self._whole_row(collection)).values()
                if not r["deleted_ms"]
                and (ingested_before_ms is None or int(r["ingest_ms"]) < ingested_before_ms)]
        for row in rows:
            row["deleted_ms"] = now_ms
        self.upsert(collection, rows)
        return len(rows)

    def relabel_clusters(self, collection: str, scope: str, losers: Sequence[str],
                         winner: str) -> int:
        """Move every live row of the ``losers`` clusters into ``winner`` (idempotent)."""
        if not losers:
            return 0
        listed = ", ".join(quote(c) for c in losers)
        rows = self.query(collection, f"{scope} and cluster_id in [{listed}]", self._whole_row(collection))
        for row in rows:
            row["cluster_id"] = winner
        self.upsert(collection, rows)
        return len(rows)

    def purge_tombstones(self, collection: str, pks: Sequence[str], deleted_before_ms: int) -> int:
        """Hard-delete those of ``pks`` tombstoned before ``deleted_before_ms``."""
        gone = [pk for pk, row in self.get(collection, pks, ["pk", "deleted_ms"]).items()
                if 0 < int(row["deleted_ms"]) < deleted_before_ms]
        if gone:
            self.client.delete(collection, filter=pk_filter(gone))
        return len(gone)

    def flush(self, collection: str) -> None:
        self.client.flush(collection)

    # -- reads -----------------------------------------------------------------------------
    def get(self, collection: str, pks: Sequence[str], fields: Sequence[str] = OUTPUT_FIELDS,
            consistency: str | None = None) -> dict[str, dict[str, Any]]:
        """Rows by key; ``consistency`` None reads at the collection's level (Strong)."""
        if not pks:
            return {}
        level = _level(consistency)
        rows = self._loaded(collection, lambda: self.client.query(
            collection, filter=pk_filter(pks), output_fields=list(fields), limit=len(pks), **level))
        return {str(row["pk"]): dict(row) for row in rows}

    def query(self, collection: str, expr: str, fields: Sequence[str] = OUTPUT_FIELDS,
              page_rows: int = 4096, consistency: str | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
        """Every row matching ``expr``, or any ``limit`` of them (a bounded read: a hint whose
        cost must not grow with the collection). One plain query stops silently at ``QUERY_CAP``
        rows, so an unbounded result that reaches the cap is read again through Milvus's query
        iterator (pages)."""
        level = _level(consistency)
        cap = QUERY_CAP if limit is None else max(1, min(limit, QUERY_CAP))

        def scan() -> list[dict[str, Any]]:
            rows = [dict(r) for r in self.client.query(collection, filter=expr, limit=cap,
                                                       output_fields=list(fields), **level)]
            if len(rows) < QUERY_CAP or limit is not None:
                return rows
            iterator = self.client.query_iterator(collection, batch_size=page_rows, filter=expr,
                                                  output_fields=list(fields))
            rows = []
            try:
                while page := iterator.next():
                    rows.extend(dict(r) for r in page)
            finally:
                iterator.close()
            return rows

        return self._loaded(collection, scan)

    def count(self, collection: str, expr: str = "") -> int:
        rows = self._loaded(collection, lambda: self.client.query(
            collection, filter=expr, output_fields=["count(*)"]))
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
        started = time.perf_counter()
        results = self._loaded(collection, lambda: self.client.search(
            collection, data=[list(map(float, v)) for v in vectors], limit=limit, filter=expr,
            output_fields=list(fields), search_params=params, consistency_level=consistency,
            offset=offset,
        ))
        self.metrics.milvus_search.observe(time.perf_counter() - started)
        return [[_hit(h) for h in hits] for hits in results]


def _level(consistency: str | None) -> dict[str, str]:
    """The query keyword for a consistency level; none keeps the collection's own."""
    return {} if consistency is None else {"consistency_level": consistency}


def _hit(raw: Any) -> Hit:
    """pymilvus names the key of a hit "id" (server) or after the primary field (Milvus Lite)."""
    keys = raw.keys() if hasattr(raw, "keys") else ()
    pk = raw["pk"] if "pk" in keys else raw["id"]
    return Hit(str(pk), float(raw["distance"]), dict(raw["entity"]))
