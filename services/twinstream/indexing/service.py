"""Indexing's batch handler: the one writer of a scope's Milvus rows.

For each batch: items already stored (a replay after a crash) get their stored decision again,
byte for byte; new items are decided, in ingest order, against Milvus and against the earlier
items of the same batch, then upserted with their decision. The loop then publishes the
decisions and commits, so a crash anywhere repeats identical decisions and never loses one.
Store commands (deletes, TTL expiry, purges) arrive on the same partitions and are applied in
their place between the inserts, so no other process read-modify-writes these rows.
A decision's time is the embedded record's time, not the clock, so two indexers handling the
same batch (a zombie after a rebalance) publish byte-identical decisions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.bundle import ModelBundle
from twinstream.common.commands import is_command
from twinstream.common.config import Settings
from twinstream.common.kafka import BatchResult, Outgoing, Rejected, parse_record
from twinstream.common.metrics import BACKFILLED, DECISIONS, INGEST_TO_DECISION, ITEMS_PROCESSED
from twinstream.common.vectorstore import (
    SIGNALS,
    VectorStore,
    decode_decision,
    encode_decision,
    quote,
    row_key,
    scope_filter,
)
from twinstream.indexing.calibration_store import CalibrationStore
from twinstream.indexing.decide import (
    Candidate,
    compare_fields,
    decide,
    item_signals,
    linked_clusters,
    observation,
)
from twinstream.v1 import decisions_pb2, items_pb2

log = logging.getLogger(__name__)
MAX_SIGNAL_BYTES = 16384  # records larger than this are decided by the cosine alone


# The dead-letter reason of an item embedded by a model version this indexer has no bundle for:
# it waits in items.dlq, untouched, until the version is deployed and the letter re-driven.
UNKNOWN_MODEL_VERSION = "unknown_model_version"


def unknown_model_detail(model: items_pb2.ModelRef) -> str:
    return (f"no bundle for model {model.name}:{model.version} in this indexer; deploy it, then "
            f"`twinstream dlq redrive --reason {UNKNOWN_MODEL_VERSION}`")


@dataclass
class _Pending:
    """The items of one batch that share a Milvus collection and a tenant/collection scope."""

    collection: str
    bundle: ModelBundle
    model: items_pb2.ModelRef
    tenant: str
    scope: str
    items: list[tuple[int, items_pb2.EmbeddedItem]] = field(default_factory=list)
    # When each item's embedded record was published: the decision's deterministic time.
    record_ms: dict[int, int] = field(default_factory=dict)
    # Items whose id is already stored (or repeated in the batch) with other content.
    conflicts: list[tuple[int, str]] = field(default_factory=list)


class Indexer:
    def __init__(self, settings: Settings, store: VectorStore, bundles: Sequence[ModelBundle]) -> None:
        self.settings = settings
        self.store = store
        self.bundles = {(b.name, b.version): b for b in bundles}
        self.calibrations = CalibrationStore(store)
        self._rows_since_flush: dict[str, int] = {}

    def __call__(self, records: Sequence[ConsumerRecord]) -> BatchResult:
        result = BatchResult()
        decided: dict[int, decisions_pb2.Decision] = {}
        fresh: list[decisions_pb2.Decision] = []
        run: list[tuple[int, ConsumerRecord]] = []
        for index, record in enumerate(records):
            if is_command(record):  # the items before it are written first, in log order
                self._index(run, result, decided, fresh)
                run = []
                self._apply(record, result)
            else:
                run.append((index, record))
        self._index(run, result, decided, fresh)
        for index in sorted(decided):
            decision = decided[index]
            result.outputs.append(Outgoing(
                self.settings.topics.decisions,
                row_key(decision.tenant, decision.collection, decision.item_id).encode(),
                decision.SerializeToString(),
            ))
        result.after_flush = lambda: _observe(fresh)
        return result

    def _index(self, records: Sequence[tuple[int, ConsumerRecord]], result: BatchResult,
               decided: dict[int, decisions_pb2.Decision],
               fresh: list[decisions_pb2.Decision]) -> None:
        """Decide and write a run of embedded items (no command between them)."""
        groups: dict[tuple[str, str, str], _Pending] = {}
        by_index = dict(records)
        for index, record in records:
            item = parse_record(record, items_pb2.EmbeddedItem)
            if isinstance(item, Rejected):
                result.rejected.append(item)
                continue
            problem = _invalid(item)
            if problem:
                result.rejected.append(Rejected(record, "invalid_embedding", problem,
                                                item.accepted.item.item_id))
                continue
            bundle = self.bundles.get((item.model.name, item.model.version))
            if bundle is None:  # deploy the bundle to indexing, then `twinstream dlq redrive`
                result.rejected.append(Rejected(record, UNKNOWN_MODEL_VERSION, unknown_model_detail(item.model),
                                                item.accepted.item.item_id))
                continue
            collection = self.store.ensure_collection(item.model, len(item.vector))
            it = item.accepted.item
            key = (collection, it.tenant, it.collection)
            if key not in groups:
                ttl = self.settings.ttl_for(it.tenant, it.collection)
                groups[key] = _Pending(collection, bundle, item.model, it.tenant,
                                       scope_filter(it.tenant, it.collection, ttl))
            groups[key].items.append((index, item))
            groups[key].record_ms[index] = max(int(record.timestamp or 0),
                                               item.accepted.ingest_time_ms)

        for group in groups.values():
            # A version that is not live is being back-filled by a re-embed job: its rows are
            # written (ready for the alias switch) but users get decisions from the live model.
            live = self.store.is_live(group.model)
            for index, decision, is_new in self._decide_group(group):
                if not live:
                    BACKFILLED.inc()
                    continue
                decided[index] = decision
                if is_new:
                    fresh.append(decision)
            for index, detail in group.conflicts:
                result.rejected.append(Rejected(by_index[index], "id_conflict", detail,
                                                dict(group.items)[index].accepted.item.item_id))

    def _apply(self, record: ConsumerRecord, result: BatchResult) -> None:
        """Apply a store command to the scope's rows in every model version's collection."""
        command = parse_record(record, items_pb2.StoreCommand)
        if isinstance(command, Rejected):
            result.rejected.append(command)
            return
        actions = items_pb2.StoreCommand
        if command.action not in (actions.DELETE, actions.EXPIRE, actions.PURGE) or not command.tenant:
            result.rejected.append(Rejected(record, "invalid_command",
                                            f"action {command.action} for tenant {command.tenant!r}"))
            return
        pks = [row_key(command.tenant, command.collection, i) for i in command.item_ids]
        changed = 0
        for collection in self.store.collections():
            if command.action == actions.PURGE:
                changed += self.store.purge_tombstones(collection, pks, command.cutoff_ms)
            else:
                changed += self.store.tombstone(
                    collection, pks, command.time_ms,
                    command.cutoff_ms if command.action == actions.EXPIRE else None)
        name = actions.Action.Name(command.action).lower()
        ITEMS_PROCESSED.labels("indexing", {"delete": "deleted", "expire": "expired",
                                            "purge": "purged"}[name]).inc(changed)
        log.info("applied store command", extra={
            "action": name, "tenant": command.tenant, "collection": command.collection,
            "items": len(pks), "changed": changed, "origin": command.origin})

    def _decide_group(self, group: _Pending) -> list[tuple[int, decisions_pb2.Decision, bool]]:
        items = group.items
        pks = [row_key(i.accepted.item.tenant, i.accepted.item.collection, i.accepted.item.item_id)
               for _, i in items]
        stored = self.store.get(group.collection, pks, ["pk", "decision", "content_hash"])
        out: list[tuple[int, decisions_pb2.Decision, bool]] = []
        todo: list[tuple[int, items_pb2.EmbeddedItem, str]] = []
        seen: dict[str, str] = {}
        for (index, item), pk in zip(items, pks, strict=True):
            content_hash = item.accepted.content_hash
            earlier = stored[pk]["content_hash"] if pk in stored else seen.get(pk, content_hash)
            if earlier != content_hash:  # e.g. two ingestion replicas each accepted the id once
                group.conflicts.append((index, f"id {item.accepted.item.item_id!r} is stored with "
                                               f"content sha256 {earlier[:12]}..., this copy has "
                                               f"{content_hash[:12]}...; ids are idempotency keys"))
            elif pk in stored:  # decided before a crash or rebalance: repeat it identically
                out.append((index, decode_decision(stored[pk]["decision"]), False))
            elif pk in seen:  # the same item twice in one batch (a producer retry)
                continue
            else:
                seen[pk] = content_hash
                todo.append((index, item, pk))
        if not todo:
            return out
        # Arrival order: a scope's items share one partition, so offset order is arrival order;
        # the stable sort only moves re-published items (older ingest times) to their place.
        todo.sort(key=lambda t: t[1].accepted.ingest_time_ms)
        vectors = np.array([list(t[1].vector) for t in todo], dtype=np.float32)
        k = self.settings.neighbours
        stored_signals = [SIGNALS] if self.store.has_signals(group.collection) else []
        hits = self.store.search(
            group.collection, vectors, limit=k, expr=group.scope,
            fields=("item_id", "cluster_id", "content_hash", "ingest_ms", "decision", *stored_signals))
        own_signals = [_signals(t[1].accepted.item) for t in todo]  # once per item, not per pair
        calibration_key = self.calibrations.key(group.collection, group.tenant, todo[0][1].accepted.item.collection)
        state = self.calibrations.load(calibration_key)
        observed = state.items
        hashes = sorted({t[1].accepted.content_hash for t in todo})
        exact_rows = self.store.query(
            group.collection,
            f"{group.scope} and content_hash in [{', '.join(quote(h) for h in hashes)}]",
            ["item_id", "cluster_id", "content_hash", "ingest_ms"],
        )
        similarity = vectors @ vectors.T
        rows = []
        merges: list[tuple[list[str], str]] = []
        batch_decisions: list[decisions_pb2.Decision] = []
        for position, (index, item, pk) in enumerate(todo):
            candidates = [
                Candidate(h.fields["item_id"], h.score, h.fields["cluster_id"],
                          int(h.fields["ingest_ms"]),
                          exact=h.fields["content_hash"] == item.accepted.content_hash,
                          refused=_refused(h.fields["decision"]), signals=_stored_signals(h.fields))
                for h in hits[position] if h.pk != pk
            ]
            candidates += [
                Candidate(r["item_id"], 1.0, r["cluster_id"], int(r["ingest_ms"]), exact=True)
                for r in exact_rows
                if r["content_hash"] == item.accepted.content_hash
                and r["item_id"] not in {c.item_id for c in candidates}
            ]
            for earlier_position, earlier in enumerate(batch_decisions):  # in-flight items
                earlier_item = todo[earlier_position][1]
                candidates.append(Candidate(
                    earlier.item_id, float(similarity[position, earlier_position]),
                    earlier.cluster_id, earlier_item.accepted.ingest_time_ms,
                    exact=earlier.content_hash == item.accepted.content_hash, in_flight=True,
                    refused=earlier.kind == decisions_pb2.OUT_OF_DISTRIBUTION,
                    signals=own_signals[earlier_position],
                ))
            signals = own_signals[position]
            if signals is not None:
                candidates = compare_fields(signals, candidates, state.field_names(signals),
                                            state.calibration.fields)
            decision = decide(item, candidates, group.bundle, k, group.record_ms[index],
                              state.calibration)
            linked = linked_clusters(decision, candidates)
            if len(linked) > 1:
                winner = self._oldest_cluster(group, linked, batch_decisions, todo)
                losers = sorted(linked - {winner})
                decision.cluster_id = winner
                decision.merged_clusters.extend(losers)
                merges.append((losers, winner))
                for earlier in batch_decisions:  # in-flight rows of merged clusters move too
                    if earlier.cluster_id in losers:
                        earlier.cluster_id = winner
            batch_decisions.append(decision)
            out.append((index, decision, True))
            observed_item = observation(decision, candidates)
            if observed_item is not None:
                state.observe(observed_item)
        # Merge before the new rows are written: a crash in between re-decides the new items
        # against already-merged clusters, so the merge is never lost nor half-applied.
        for losers, winner in merges:
            self.store.relabel_clusters(group.collection, group.scope, losers, winner)
        # Fence for a zombie (paused past a rebalance while its successor went on): rows stored
        # since this batch read Milvus win and their decisions are repeated, never overwritten.
        written = self.store.get(group.collection, [pk for _, _, pk in todo], ["pk", "decision"])
        since = {index: decode_decision(written[pk]["decision"])
                 for index, _, pk in todo if pk in written}
        if since:
            out = [(i, since.get(i, d), new and i not in since) for i, d, new in out]
        for (index, item, pk), decision, signals in zip(todo, batch_decisions, own_signals,
                                                      strict=True):
            if index not in since:
                rows.append(_row(pk, item, decision, signals))
        self.store.upsert(group.collection, rows)
        # After the rows: a crash in between re-delivers the batch, whose items then get their
        # stored decisions and are not observed twice (a few observations may be lost, never doubled).
        if state.items != observed:
            self.calibrations.save(calibration_key, state)
        self._maybe_flush(group.collection, len(rows))
        return out

    def _oldest_cluster(self, group: _Pending, clusters: set[str],
                        batch: Sequence[decisions_pb2.Decision],
                        todo: Sequence[tuple[int, items_pb2.EmbeddedItem, str]]) -> str:
        """The cluster whose earliest member came first survives a merge (stable canonical)."""
        first_seen: dict[str, tuple[int, str]] = {}
        listed = ", ".join(quote(c) for c in sorted(clusters))
        for row in self.store.query(group.collection, f"{group.scope} and cluster_id in [{listed}]",
                                    ["cluster_id", "item_id", "ingest_ms"]):
            key = (int(row["ingest_ms"]), str(row["item_id"]))
            first_seen[row["cluster_id"]] = min(first_seen.get(row["cluster_id"], key), key)
        for decision, (_, item, _) in zip(batch, todo, strict=False):
            if decision.cluster_id in clusters:
                key = (item.accepted.ingest_time_ms, decision.item_id)
                first_seen[decision.cluster_id] = min(first_seen.get(decision.cluster_id, key), key)
        return min(clusters, key=lambda c: (first_seen.get(c, (2**62, c)), c))

    def _maybe_flush(self, collection: str, added: int) -> None:
        """Milvus Lite searches unflushed rows slowly; seal them every ``milvus_flush_rows``."""
        if self.settings.milvus_flush_rows <= 0:
            return
        count = self._rows_since_flush.get(collection, 0) + added
        if count >= self.settings.milvus_flush_rows:
            self.store.flush(collection)
            count = 0
        self._rows_since_flush[collection] = count


def _stored_signals(row: dict[str, Any]) -> dict[str, object] | None:
    """A stored item's signals (``None``: an image, or stored before signals existed)."""
    signals = row.get(SIGNALS)
    return signals if isinstance(signals, dict) and signals else None


def _refused(stored: str) -> bool:
    """Whether a stored row was decided OUT_OF_DISTRIBUTION (its links never count)."""
    return decode_decision(stored).kind == decisions_pb2.OUT_OF_DISTRIBUTION


def _invalid(item: items_pb2.EmbeddedItem) -> str:
    if not item.accepted.item.item_id or not item.accepted.item.tenant:
        return "the item has no id or tenant"
    if not item.vector:
        return "the item has no vector"
    if not np.all(np.isfinite(np.asarray(item.vector, dtype=np.float32))):
        return "the vector has NaN or infinite values"
    return ""


def _row(pk: str, item: items_pb2.EmbeddedItem, decision: decisions_pb2.Decision,
         signals: dict[str, object] | None) -> dict[str, object]:
    it = item.accepted.item
    return {
        "pk": pk,
        "item_id": it.item_id,
        "tenant": it.tenant,
        "collection": it.collection,
        "content_hash": item.accepted.content_hash,
        "cluster_id": decision.cluster_id,
        "ingest_ms": item.accepted.ingest_time_ms,
        "event_ms": it.event_time_ms,
        "metadata": dict(it.metadata),
        "decision": encode_decision(decision),
        "deleted_ms": 0,
        SIGNALS: signals or {},  # never null: Milvus before 2.5 ignores nullable and rejects it
        "vector": list(item.vector),
    }


def _signals(item: items_pb2.Item) -> dict[str, object] | None:
    """What later items are compared with beside the vector (records: only small ones)."""
    if item.modality == items_pb2.RECORD and len(item.content) > MAX_SIGNAL_BYTES:
        return None
    return item_signals(item)


def _observe(decisions: Sequence[decisions_pb2.Decision]) -> None:
    now = time.time()
    for decision in decisions:
        DECISIONS.labels(decisions_pb2.DecisionKind.Name(decision.kind)).inc()
        INGEST_TO_DECISION.observe(max(0.0, now - decision.ingest_time_ms / 1000))
