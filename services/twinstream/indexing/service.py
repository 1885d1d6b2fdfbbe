"""Indexing's batch handler: the one writer of a scope's Milvus rows.

For each batch: items already stored (a replay after a crash) get their stored decision again,
byte for byte; new items are decided, in ingest order, against Milvus and against the earlier
items of the same batch, then upserted with their decision. The loop then publishes the
decisions and commits, so a crash anywhere repeats identical decisions and never loses one.
Store commands (deletes, TTL expiry, purges) arrive on the same partitions and are applied in
their place between the inserts, so no other process read-modify-writes these rows.
A decision's time is the embedded record's time, not the clock, so two indexers handling the
same batch (a zombie after a rebalance) publish byte-identical decisions.
This module does the IO (reads, writes, the calibration store); what to write is decided by the
pure functions of ``indexing.plan``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.commands import is_command
from twinstream.common.config import Settings
from twinstream.common.kafka import BatchResult, Rejected, parse_record
from twinstream.common.metrics import Metrics
from twinstream.common.vectorstore import DECIDE_CONSISTENCY, SIGNALS, VectorStore, quote, scope_filter
from twinstream.indexing.blocking import KEYS, KEYS_PER_QUERY, MAX_KEY_ROWS
from twinstream.indexing.calibration_store import CalibrationStore
from twinstream.indexing.plan import (
    GroupReads,
    IndexPlan,
    Pending,
    Triage,
    earliest_members,
    fence,
    invalid,
    lookup_keys,
    outgoing,
    plan_command,
    plan_steps,
    triage,
)
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import decisions_pb2, items_pb2

log = logging.getLogger(__name__)


# The dead-letter reason of an item embedded by a model version this indexer has no bundle for:
# it waits in items.dlq, untouched, until the version is deployed and the letter re-driven.
UNKNOWN_MODEL_VERSION = "unknown_model_version"


def unknown_model_detail(model: items_pb2.ModelRef) -> str:
    return (f"no bundle for model {model.name}:{model.version} in this indexer; deploy it, then "
            f"`twinstream dlq redrive --reason {UNKNOWN_MODEL_VERSION}`")


class Indexer:
    def __init__(self, settings: Settings, store: VectorStore, bundles: Sequence[ModelBundle],
                 calibrations: CalibrationStore | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics.unexported()
        self.store = store
        self.bundles = {(b.name, b.version): b for b in bundles}
        self.calibrations = calibrations or CalibrationStore(store)
        self._rows_since_flush: dict[str, int] = {}
        # Collections this indexer wrote since its partitions were last assigned (docs/store.md).
        self._written: set[str] = set()

    def on_rebalance(self) -> None:
        """The partitions owned changed: another indexer may have written these scopes since."""
        self._written.clear()
        self.calibrations.forget()

    def _level(self, collection: str) -> str:
        """How fresh a decide-path read of ``collection`` must be.

        Strong sees every write acknowledged before the read, at the cost of waiting for Milvus'
        next time tick. Session sees every write of this client, and that is enough once this
        indexer has written the collection since its assignment: Milvus' timestamps are
        monotonic, so that write is younger than any row the partition's previous owner wrote
        before the rebalance handed the partition over, and Session waits for it.
        """
        if self.settings.search.decide_session_reads and collection in self._written:
            return "Session"
        return DECIDE_CONSISTENCY

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
        result.outputs.extend(outgoing(decided, self.settings.topics.decisions))
        result.after_flush = lambda: _observe(self.metrics, fresh)
        return result

    def _index(self, records: Sequence[tuple[int, ConsumerRecord]], result: BatchResult,
               decided: dict[int, decisions_pb2.Decision],
               fresh: list[decisions_pb2.Decision]) -> None:
        """Decide and write a run of embedded items (no command between them)."""
        groups: dict[tuple[str, str, str], Pending] = {}
        for index, record in records:
            item = parse_record(record, items_pb2.EmbeddedItem)
            if isinstance(item, Rejected):
                result.rejected.append(item)
                continue
            problem = invalid(item)
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
                ttl = self.settings.retention.ttl_for(it.tenant, it.collection)
                groups[key] = Pending(collection, bundle, item.model, it.tenant,
                                      scope_filter(it.tenant, it.collection, ttl))
            groups[key].add(index, record, item)

        for group in groups.values():
            # A version that is not live is being back-filled by a re-embed job: its rows are
            # written (ready for the alias switch) but users get decisions from the live model.
            live = self.store.is_live(group.model)
            plan = self._decide_group(group)
            for index, decision, is_new in plan.decided:
                if not live:
                    self.metrics.backfilled.inc()
                    continue
                decided[index] = decision
                if is_new:
                    fresh.append(decision)
            result.rejected.extend(plan.rejected)

    def _apply(self, record: ConsumerRecord, result: BatchResult) -> None:
        """Apply a store command to the scope's rows in every model version's collection."""
        plan = plan_command(record)
        if isinstance(plan, Rejected):
            result.rejected.append(plan)
            return
        changed = 0
        for collection in self.store.collections():
            if plan.purge:
                changed += self.store.purge_tombstones(collection, plan.pks, plan.cutoff_ms)
            else:
                changed += self.store.tombstone(collection, plan.pks, plan.time_ms, plan.ingested_before_ms)
        self.metrics.items_processed.labels({"delete": "deleted", "expire": "expired",
                                             "purge": "purged"}[plan.name]).inc(changed)
        command = plan.command
        log.info("applied store command", extra={
            "action": plan.name, "tenant": command.tenant, "collection": command.collection,
            "items": len(plan.pks), "changed": changed, "origin": command.origin})

    def _decide_group(self, group: Pending) -> IndexPlan:
        """Read what the group's items are decided against, plan, and write the plan."""
        level = self._level(group.collection)
        stored = self.store.get(group.collection, group.pks, ["pk", "decision", "content_hash"], level)
        triaged = triage(group, stored)
        if not triaged.todo:
            return IndexPlan(list(triaged.repeated), rejected=list(triaged.rejected))
        calibration_key = self.calibrations.key(group.collection, group.tenant,
                                                triaged.todo[0][1].accepted.item.collection)
        reads = self._read(group, triaged, calibration_key, level)
        steps = plan_steps(group, triaged, reads, self.settings.search.neighbours)
        try:
            clusters = next(steps)
            while True:  # a merge needs its clusters' earliest stored members
                clusters = steps.send(self._first_seen(group, clusters, level))
        except StopIteration as done:
            plan: IndexPlan = done.value
        # Merge before the new rows are written: a crash in between re-decides the new items
        # against already-merged clusters, so the merge is never lost nor half-applied.
        for losers, winner in plan.merges:
            self.store.relabel_clusters(group.collection, group.scope, losers, winner)
        # Fence for a zombie (paused past a rebalance while its successor went on): Strong, as the
        # zombie is another client, so Session would not wait for its rows.
        written = self.store.get(group.collection, [str(row["pk"]) for row in plan.rows.values()],
                                 ["pk", "decision"], DECIDE_CONSISTENCY)
        plan = fence(plan, written)
        self.store.upsert(group.collection, list(plan.rows.values()))
        if plan.rows:
            self._written.add(group.collection)
        # After the rows: a crash in between re-delivers the batch, whose items then get their
        # stored decisions and are not observed twice (a few observations may be lost, never doubled).
        if plan.state is not None:
            self.calibrations.save(calibration_key, plan.state)
        self._maybe_flush(group.collection, len(plan.rows))
        return plan

    def _read(self, group: Pending, triaged: Triage, calibration_key: str,
              level: str = DECIDE_CONSISTENCY) -> GroupReads:
        """The new items' nearest stored rows, the stored rows sharing a blocking key with one,
        the stored copies of their content, the scope's calibration state."""
        stored_signals = [SIGNALS] if self.store.has_signals(group.collection) else []
        state = self.calibrations.load(calibration_key)
        hits = self.store.search(
            group.collection, triaged.vectors, limit=self.settings.search.neighbours, expr=group.scope,
            fields=("item_id", "cluster_id", "content_hash", "ingest_ms", "decision", *stored_signals),
            consistency=level)
        hashes = sorted({t[1].accepted.content_hash for t in triaged.todo})
        exact_rows = self.store.query(
            group.collection,
            f"{group.scope} and content_hash in [{', '.join(quote(h) for h in hashes)}]",
            ["item_id", "cluster_id", "content_hash", "ingest_ms"], consistency=level,
        )
        keys = lookup_keys(triaged, state) if stored_signals and self.settings.search.keyed_reads else []
        keyed = self._keyed(group, sorted({key for item_keys in keys for key in item_keys}), level)
        return GroupReads(hits, exact_rows, state, keyed=keyed, keys=keys)

    def _keyed(self, group: Pending, keys: Sequence[str], level: str) -> list[dict[str, Any]]:
        """The scope's stored rows sharing one of ``keys`` (one query per ``KEYS_PER_QUERY`` keys:
        a batch's keys fit one, a warm-up batch of wide records may not). Each query reads at most
        ``MAX_KEY_ROWS`` + 1 rows a key: more can only come from keys ``shared_keys`` ignores as
        common, and an unbounded read would grow with the collection (a shared pair of common
        values in a large scope)."""
        rows: dict[str, dict[str, Any]] = {}
        if not keys:
            return []
        started = time.perf_counter()
        for start in range(0, len(keys), KEYS_PER_QUERY):
            chunk = keys[start:start + KEYS_PER_QUERY]
            listed = ", ".join(quote(k) for k in chunk)
            for row in self.store.query(
                    group.collection, f"{group.scope} and json_contains_any({SIGNALS}[{quote(KEYS)}], [{listed}])",
                    ["item_id", "cluster_id", "content_hash", "ingest_ms", "decision", SIGNALS, "vector"],
                    consistency=level, limit=len(chunk) * (MAX_KEY_ROWS + 1)):
                rows[str(row["item_id"])] = row
        self.metrics.keyed_read.observe(time.perf_counter() - started)
        return list(rows.values())

    def _first_seen(self, group: Pending, clusters: set[str],
                    level: str = DECIDE_CONSISTENCY) -> dict[str, tuple[int, str] | None]:
        listed = ", ".join(quote(c) for c in sorted(clusters))
        rows = self.store.query(group.collection, f"{group.scope} and cluster_id in [{listed}]",
                                ["cluster_id", "item_id", "ingest_ms"], consistency=level)
        return earliest_members(rows, clusters)

    def _maybe_flush(self, collection: str, added: int) -> None:
        """Milvus Lite searches unflushed rows slowly; seal them every ``milvus_flush_rows``."""
        if self.settings.milvus.flush_rows <= 0:
            return
        count = self._rows_since_flush.get(collection, 0) + added
        if count >= self.settings.milvus.flush_rows:
            self.store.flush(collection)
            count = 0
        self._rows_since_flush[collection] = count


def _observe(metrics: Metrics, decisions: Sequence[decisions_pb2.Decision]) -> None:
    now = time.time()
    for decision in decisions:
        metrics.decisions.labels(decisions_pb2.DecisionKind.Name(decision.kind)).inc()
        metrics.ingest_to_decision.observe(max(0.0, now - decision.ingest_time_ms / 1000))
