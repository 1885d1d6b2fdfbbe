"""The Matching gRPC servicer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np

from twinstream.common import status
from twinstream.common.commands import store_commands
from twinstream.common.config import Settings
from twinstream.common.encoding import ContentError, ItemEncoder
from twinstream.common.kafka import Outgoing
from twinstream.common.vectorstore import MATCH_CONSISTENCY, Hit, VectorStore, decode_decision, quote, row_key
from twinstream.matching.requests import (
    BadRequest,
    OverLimit,
    check_item_id,
    check_scope,
    full_filter,
    metadata_filter,
    next_page_token,
    page_offset,
    time_filter,
)
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import items_pb2, matching_pb2, matching_pb2_grpc

log = logging.getLogger(__name__)
DEFAULT_K = 10
# Milvus caps offset + limit of one search at 16384.
MAX_WINDOW = 16384
# Ids of one Delete are looked up in one Milvus query, whose limit is also 16384.
MAX_DELETE_IDS = 10_000
T = TypeVar("T")
RESULT_FIELDS = ["item_id", "cluster_id", "ingest_ms", "metadata", "decision"]
# What looking an item up by id reads (its vector for Match by id, the rest for Get and visibility).
LOOKUP_FIELDS = ["pk", "vector", *RESULT_FIELDS, "content_hash", "event_ms", "deleted_ms"]


class NotFound(status.NotFound):
    """NOT_FOUND with this message."""


class Matching(matching_pb2_grpc.MatchingServicer):
    """Answers queries against each model's live collection (its alias)."""

    def __init__(self, settings: Settings, store: VectorStore, encoders: Sequence[ItemEncoder],
                 send: Callable[[Sequence[Outgoing]], None]) -> None:
        self.settings = settings
        self.store = store
        self._all_encoders = list(encoders)
        # Publishes store commands and waits for the broker's acknowledgement: matching never
        # writes rows itself; indexing applies deletes in order with the scope's inserts.
        self.send = send

    @property
    def encoders(self) -> list[ItemEncoder]:
        """The encoders of the live versions (a model may be loaded in several versions while a
        re-embed job fills the next one; queries follow its alias)."""
        live = [e for e in self._all_encoders if self.store.is_live(e.bundle.model_ref)]
        names = {e.bundle.name for e in live}
        return live + [e for e in self._all_encoders if e.bundle.name not in names]

    # -- helpers -----------------------------------------------------------------------------
    def _live(self, bundle: ModelBundle) -> str:
        return self.store.alias_name(bundle.name)

    def _find_item(self, tenant: str, collection: str,
                   item_id: str) -> tuple[ItemEncoder, dict[str, Any]]:
        pk = row_key(tenant, collection, item_id)
        for encoder in self.encoders:
            live = self._live(encoder.bundle)
            rows: dict[str, dict[str, Any]] = self._unless_unindexed(
                live, partial(self.store.get, live, [pk], LOOKUP_FIELDS), {})
            if pk in rows and self._visible(rows[pk], tenant, collection):
                return encoder, rows[pk]
        raise NotFound(f"item {item_id!r} not found in tenant {tenant!r} collection {collection!r}")

    def _unless_unindexed(self, live: str, read: Callable[[], T], nothing: T) -> T:
        """``read()`` of a model's live collection, or ``nothing`` when it failed because the model
        has indexed nothing yet (no collection: the same empty answer as a tenant with no items,
        docs/errors.md). Asked only after a failure, so a read costs one round trip to Milvus."""
        try:
            return read()
        except Exception:
            if self.store.exists(live):
                raise
            return nothing

    def _visible(self, row: dict[str, Any], tenant: str, collection: str) -> bool:
        """Not deleted and, where the scope has a TTL, not expired."""
        ttl = self.settings.retention.ttl_for(tenant, collection)
        expired = ttl > 0 and int(row["ingest_ms"]) < time.time() * 1000 - ttl * 1000
        return not row["deleted_ms"] and not expired

    def _query_vector(self, request: matching_pb2.MatchRequest,
                      collection: str) -> tuple[ItemEncoder, list[float], str, int]:
        """(encoder, query vector, the query item's id if it is stored, its modality if known)."""
        which = request.WhichOneof("query")
        if which == "item_id":
            check_item_id(request.item_id)
            encoder, row = self._find_item(request.tenant, collection, request.item_id)
            modality = decode_decision(row.get("decision") or "").modality
            return encoder, list(row["vector"]), request.item_id, modality
        if which == "vector":
            values = np.asarray(request.vector.values, dtype=np.float32)
            matches = [e for e in self.encoders if e.bundle.dim == len(values)]
            if not matches:
                dims = sorted({e.bundle.dim for e in self.encoders})
                raise BadRequest(f"vector has {len(values)} dimensions; the models use {dims}")
            if not np.all(np.isfinite(values)) or not np.any(values):
                raise BadRequest("vector must be finite and non-zero")
            return matches[0], values.tolist(), "", items_pb2.MODALITY_UNSPECIFIED
        if which == "content":
            content = request.content
            found = next((e for e in self.encoders if e.bundle.serves(content.modality)), None)
            if found is None:
                raise BadRequest(
                    f"no model serves modality {items_pb2.Modality.Name(content.modality)}"
                    if content.modality in items_pb2.Modality.values()
                    else f"unknown modality {content.modality}")
            if not content.content:
                raise BadRequest("content is empty")
            if len(content.content) > self.settings.limits.max_item_bytes:
                raise OverLimit(f"content exceeds {self.settings.limits.max_item_bytes} bytes")
            try:
                prepared = found.model_input(content.modality, content.content)
            except ContentError as exc:
                raise BadRequest(f"{exc.reason}: {exc.detail}") from exc
            vector = found.encode([prepared]).vectors[0]
            return found, vector.tolist(), "", content.modality
        raise BadRequest("set one of item_id, content or vector")

    def _match(self, request: matching_pb2.MatchRequest,
               context: grpc.ServicerContext) -> matching_pb2.MatchResponse:
        collection = check_scope(request.tenant, request.collection)
        k = request.k or DEFAULT_K
        if k < 0:
            raise BadRequest("k must be positive")
        if k > self.settings.limits.match_k_limit:
            raise OverLimit(f"k={k} exceeds the limit of {self.settings.limits.match_k_limit}")
        if not 0.0 <= request.min_score <= 1.0:
            raise BadRequest("min_score must be within [0, 1]")
        offset = page_offset(request)
        expr = full_filter(request.tenant, collection,
                           self.settings.retention.ttl_for(request.tenant, collection),
                           metadata_filter(request.filters),
                           time_filter(request.from_time_ms, request.to_time_ms))
        encoder, vector, self_id, modality = self._query_vector(request, collection)
        if self_id and not request.include_self:
            expr = f"{expr} and (item_id != {quote(self_id)})"
        if offset + k > MAX_WINDOW:
            raise OverLimit(f"offset+k may not exceed {MAX_WINDOW}; narrow the query")
        remaining = context.time_remaining()
        if remaining is not None and remaining < 0.005:
            raise TimeoutError("the deadline expired before the search started")
        live = self._live(encoder.bundle)
        hits: list[Hit] = self._unless_unindexed(live, lambda: self.store.search(
            live, [vector], limit=k + 1, expr=expr, fields=RESULT_FIELDS,
            min_score=request.min_score or None, offset=offset,
            consistency=MATCH_CONSISTENCY,
        )[0], [])
        bundle = encoder.bundle.for_modality(modality)
        response = matching_pb2.MatchResponse(model=bundle.model_ref, request_id=request.request_id,
                                              thresholds=bundle.thresholds)
        for hit in hits[:k]:
            fields = hit.fields
            response.results.add(
                item_id=fields["item_id"], score=hit.score,
                duplicate_probability=bundle.duplicate_probability(hit.score),
                cluster_id=fields["cluster_id"], ingest_time_ms=int(fields["ingest_ms"]),
                metadata={str(a): str(b) for a, b in (fields.get("metadata") or {}).items()},
                decision=decode_decision(fields.get("decision") or "").kind,
            )
        if len(hits) > k:
            response.next_page_token = next_page_token(request, offset + k)
        return response

    # -- gRPC methods ------------------------------------------------------------------------
    # Errors are raised, never caught here: the server's interceptor maps them to status codes
    # (common/status.py: BadRequest -> INVALID_ARGUMENT, Milvus/Triton down -> UNAVAILABLE, ...).
    def Match(self, request: matching_pb2.MatchRequest,
              context: grpc.ServicerContext) -> matching_pb2.MatchResponse:
        return self._match(request, context)

    def MatchStream(self, request_iterator: Iterator[matching_pb2.MatchRequest],
                    context: grpc.ServicerContext) -> Iterator[matching_pb2.MatchResponse]:
        """One answer per request, in order; the first failing request ends the stream."""
        for request in request_iterator:
            yield self._match(request, context)

    def _lookup(self, request: matching_pb2.GetRequest | matching_pb2.GetClusterRequest
                ) -> tuple[str, ItemEncoder, dict[str, Any]]:
        """Validate an item reference; returns (collection, its model's encoder, its row)."""
        collection = check_scope(request.tenant, request.collection)
        check_item_id(request.item_id)
        return (collection, *self._find_item(request.tenant, collection, request.item_id))

    def Get(self, request: matching_pb2.GetRequest,
            context: grpc.ServicerContext) -> matching_pb2.StoredItem:
        collection, _encoder, row = self._lookup(request)
        decision = decode_decision(row.get("decision") or "")
        return matching_pb2.StoredItem(
            item_id=row["item_id"], tenant=request.tenant, collection=collection,
            content_hash=row["content_hash"], ingest_time_ms=int(row["ingest_ms"]),
            event_time_ms=int(row["event_ms"]), decision=decision, model=decision.model,
            cluster_id=row["cluster_id"],
            metadata={str(a): str(b) for a, b in (row.get("metadata") or {}).items()},
        )

    def Delete(self, request: matching_pb2.DeleteRequest,
               context: grpc.ServicerContext) -> matching_pb2.DeleteResponse:
        """Find the live items the request names, hand a DELETE command to indexing (the
        scope's one writer) and wait, within the deadline, until it has tombstoned them."""
        collection = check_scope(request.tenant, request.collection)
        if len(request.item_ids) > MAX_DELETE_IDS:
            raise OverLimit(f"at most {MAX_DELETE_IDS} item_ids per Delete")
        for item_id in request.item_ids:
            check_item_id(item_id)
        if not request.item_ids and not request.filters:
            raise BadRequest("give item_ids or filters; deleting a whole collection is not "
                             "offered through this call")
        if request.item_ids and request.filters:
            raise BadRequest("give item_ids or filters, not both")
        conditions = metadata_filter(request.filters)
        targets: dict[str, set[str]] = {}  # live collection -> pks of live items
        for encoder in self.encoders:
            live = self._live(encoder.bundle)
            if not self.store.exists(live):
                continue
            if request.item_ids:
                pks = [row_key(request.tenant, collection, i) for i in request.item_ids]
                rows = self.store.get(live, pks, ["pk", "deleted_ms"]).values()
                found = {r["pk"] for r in rows if not r["deleted_ms"]}
            else:
                expr = full_filter(request.tenant, collection, 0, conditions)
                found = {r["pk"] for r in self.store.query(live, expr, ["pk"])}
            targets[live] = found
        prefix = f"{request.tenant}/{collection}/"
        item_ids = sorted({pk[len(prefix):] for found in targets.values() for pk in found})
        if not item_ids:
            return matching_pb2.DeleteResponse(deleted=0)
        self.send(list(store_commands(self.settings, items_pb2.StoreCommand.DELETE, request.tenant,
                                      collection, item_ids, int(time.time() * 1000),
                                      origin="matching.Delete")))
        wait_s = self.settings.retention.delete_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - 0.05)
        return matching_pb2.DeleteResponse(deleted=len(item_ids),
                                           pending=not self._applied(targets, wait_s))

    def _applied(self, targets: dict[str, set[str]], wait_s: float) -> bool:
        """Whether every target row is tombstoned (or gone) within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        left = {live: set(pks) for live, pks in targets.items() if pks}
        while True:
            for live in list(left):
                rows = self.store.get(live, sorted(left[live]), ["pk", "deleted_ms"])
                left[live] = {pk for pk, row in rows.items() if not row["deleted_ms"]}
                if not left[live]:
                    del left[live]
            if not left:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def GetCluster(self, request: matching_pb2.GetClusterRequest,
                   context: grpc.ServicerContext) -> matching_pb2.Cluster:
        collection, encoder, row = self._lookup(request)
        cluster_id = row["cluster_id"]
        members = self.store.query(
            self._live(encoder.bundle),
            full_filter(request.tenant, collection,
                        self.settings.retention.ttl_for(request.tenant, collection),
                        f"cluster_id == {quote(cluster_id)}"),
            ["item_id", "ingest_ms"],
        )
        members.sort(key=lambda r: (int(r["ingest_ms"]), r["item_id"]))
        return matching_pb2.Cluster(
            cluster_id=cluster_id,
            canonical_item_id=members[0]["item_id"] if members else request.item_id,
            member_ids=[m["item_id"] for m in members],
        )

