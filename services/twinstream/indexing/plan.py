"""The indexer's decisions, as pure functions of a batch and what the indexer read for it.

``service.Indexer`` (the apply step) reads Milvus and the calibration store, hands the reads to
these functions, and writes what they return: an ``IndexPlan`` per group of items (one Milvus
collection and tenant/collection scope) holds its decisions, the rows to upsert, the cluster
merges, the dead letters and the calibration state to save. Nothing here does IO, so a group's
decisions are a function of its records and the reads, and a replay with the same reads repeats
them byte for byte (tests/unit/indexing/test_plan.py). The decision rule itself is
``indexing.decide``.
"""

from __future__ import annotations

import copy
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import Any

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord

from twinstream.common.kafka import Outgoing, Rejected, parse_record
from twinstream.common.vectorstore import SIGNALS, Hit, decode_decision, encode_decision, row_key
from twinstream.indexing.blocking import (
    blocking_keys,
    postings_of,
    selective_fields,
    shared_keys,
    with_keyed,
    with_keys,
)
from twinstream.indexing.calibration import CollectionState
from twinstream.indexing.decide import (
    Candidate,
    compare_fields,
    decide,
    item_signals,
    linked_clusters,
    observation,
)
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import decisions_pb2, items_pb2

MAX_SIGNAL_BYTES = 16384  # records larger than this are decided by the cosine alone
# (batch index, decision, whether it was decided now rather than repeated from a stored row)
Decided = tuple[int, decisions_pb2.Decision, bool]
FirstSeen = tuple[int, str]  # a cluster's earliest member: (ingest_ms, item_id)


@dataclass
class Pending:
    """The items of one batch that share a Milvus collection and a tenant/collection scope."""

    collection: str
    bundle: ModelBundle
    model: items_pb2.ModelRef
    tenant: str
    scope: str
    items: list[tuple[int, items_pb2.EmbeddedItem]] = field(default_factory=list)
    # When each item's embedded record was published: the decision's deterministic time.
    record_ms: dict[int, int] = field(default_factory=dict)
    records: dict[int, ConsumerRecord] = field(default_factory=dict)  # for dead letters

    def add(self, index: int, record: ConsumerRecord, item: items_pb2.EmbeddedItem) -> None:
        self.items.append((index, item))
        self.records[index] = record
        self.record_ms[index] = max(int(record.timestamp or 0), item.accepted.ingest_time_ms)

    @property
    def pks(self) -> list[str]:
        return [_pk(item) for _, item in self.items]


@dataclass(frozen=True)
class Triage:
    """A group's items after the first read (their stored rows): which repeat a stored
    decision, which are new (``todo``, in arrival order) and which conflict with a stored id."""

    repeated: list[Decided]
    todo: list[tuple[int, items_pb2.EmbeddedItem, str]]
    rejected: list[Rejected]

    @cached_property
    def vectors(self) -> np.ndarray:
        return np.array([list(t[1].vector) for t in self.todo], dtype=np.float32)

    @cached_property
    def signals(self) -> list[dict[str, object] | None]:
        """Each new item's pair signals with its blocking keys (``_signals``): parsed once, read
        by the keyed lookup, the plan and the rows written."""
        return [_signals(t[1].accepted.item) for t in self.todo]


@dataclass(frozen=True)
class GroupReads:
    """What the indexer read to decide a group's new items."""

    hits: Sequence[Sequence[Hit]]  # per new item, its nearest stored rows in the scope
    exact_rows: Sequence[Mapping[str, Any]]  # stored rows sharing a content hash with a new item
    state: CollectionState  # the scope's calibration state (the plan changes a copy)
    # Earliest stored member of each cluster (``None``: no stored member): read only when a
    # merge needs it, as merges are rare (``plan_steps``).
    first_seen: Mapping[str, FirstSeen | None] = field(default_factory=dict)
    # Stored rows sharing a blocking key with a new item (``indexing.blocking``), with their
    # signals and vectors: candidates the cosine top-k may have missed; ``keys``: per new item,
    # the keys they were read by (``lookup_keys``).
    keyed: Sequence[Mapping[str, Any]] = ()
    keys: Sequence[Sequence[str]] = ()


class ClustersNeeded(Exception):
    """A merge needs the earliest stored member of these clusters, which were not read."""

    def __init__(self, clusters: set[str]) -> None:
        super().__init__(f"first members of clusters {sorted(clusters)} not read")
        self.clusters = clusters


@dataclass(frozen=True)
class IndexPlan:
    """What to write for one group, in this order: ``merges`` (relabel stored rows), ``rows``
    (upsert), ``state`` (the calibration, when it changed); then publish ``decided``."""

    decided: list[Decided]
    rows: dict[int, dict[str, object]] = field(default_factory=dict)  # batch index -> row
    merges: list[tuple[list[str], str]] = field(default_factory=list)  # (losers, winner)
    rejected: list[Rejected] = field(default_factory=list)
    state: CollectionState | None = None  # to save; None when nothing was observed


@dataclass(frozen=True)
class CommandPlan:
    """A store command resolved to rows: purge tombstones older than ``cutoff_ms``, or
    tombstone live rows at ``time_ms`` (only those ingested before ``ingested_before_ms``)."""

    command: items_pb2.StoreCommand
    pks: list[str]
    purge: bool
    time_ms: int
    cutoff_ms: int
    ingested_before_ms: int | None

    @property
    def name(self) -> str:
        return items_pb2.StoreCommand.Action.Name(self.command.action).lower()


def plan_command(record: ConsumerRecord) -> CommandPlan | Rejected:
    """What a store command record asks (every model version's collection), or its dead letter."""
    command = parse_record(record, items_pb2.StoreCommand)
    if isinstance(command, Rejected):
        return command
    actions = items_pb2.StoreCommand
    if command.action not in (actions.DELETE, actions.EXPIRE, actions.PURGE) or not command.tenant:
        return Rejected(record, "invalid_command", f"action {command.action} for tenant {command.tenant!r}")
    return CommandPlan(command, [row_key(command.tenant, command.collection, i) for i in command.item_ids],
                       purge=command.action == actions.PURGE, time_ms=command.time_ms,
                       cutoff_ms=command.cutoff_ms,
                       ingested_before_ms=command.cutoff_ms if command.action == actions.EXPIRE else None)


def triage(group: Pending, stored: Mapping[str, Mapping[str, Any]]) -> Triage:
    """Sort a group's items by their stored rows (``pk -> {decision, content_hash}``)."""
    repeated: list[Decided] = []
    todo: list[tuple[int, items_pb2.EmbeddedItem, str]] = []
    rejected: list[Rejected] = []
    seen: dict[str, str] = {}
    for (index, item), pk in zip(group.items, group.pks, strict=True):
        content_hash = item.accepted.content_hash
        earlier = stored[pk]["content_hash"] if pk in stored else seen.get(pk, content_hash)
        if earlier != content_hash:  # e.g. two ingestion replicas each accepted the id once
            rejected.append(Rejected(
                group.records[index], "id_conflict",
                f"id {item.accepted.item.item_id!r} is stored with content sha256 {earlier[:12]}..., "
                f"this copy has {content_hash[:12]}...; ids are idempotency keys",
                item.accepted.item.item_id))
        elif pk in stored:  # decided before a crash or rebalance: repeat it identically
            repeated.append((index, decode_decision(stored[pk]["decision"]), False))
        elif pk in seen:  # the same item twice in one batch (a producer retry)
            continue
        else:
            seen[pk] = content_hash
            todo.append((index, item, pk))
    # Arrival order: a scope's items share one partition, so offset order is arrival order;
    # the stable sort only moves re-published items (older ingest times) to their place.
    todo.sort(key=lambda t: t[1].accepted.ingest_time_ms)
    return Triage(repeated, todo, rejected)


def lookup_keys(triaged: Triage, state: CollectionState) -> list[list[str]]:
    """Per new item of a group, the blocking keys the indexer reads stored rows by (one query
    for the group: ``GroupReads.keyed``) and the plan looks the item's keyed candidates up by;
    the selective fields come from the scope's state as read, the same for the whole group."""
    fields = selective_fields(state)
    return [blocking_keys(signals, fields) for signals in triaged.signals]


def plan_group(group: Pending, triaged: Triage, reads: GroupReads, neighbours: int) -> IndexPlan:
    """Decide a group's new items in arrival order, against the stored rows read and the earlier
    items of the batch (in flight). Raises ``ClustersNeeded`` when a merge needs clusters
    ``reads.first_seen`` lacks (``plan_steps`` asks for them instead)."""
    steps = plan_steps(group, triaged, reads, neighbours)
    try:
        raise ClustersNeeded(next(steps))
    except StopIteration as done:
        return done.value


def plan_steps(group: Pending, triaged: Triage, reads: GroupReads,
               neighbours: int) -> Generator[set[str], Mapping[str, FirstSeen | None], IndexPlan]:
    """``plan_group`` as a coroutine that yields the clusters a merge needs beyond
    ``reads.first_seen`` and is sent their earliest stored members (``earliest_members``), so
    the caller reads them when, and only when, a merge needs them, in one pass."""
    todo = triaged.todo
    out = list(triaged.repeated)
    if not todo:
        return IndexPlan(out, rejected=list(triaged.rejected))
    vectors = triaged.vectors
    own_signals = triaged.signals  # once per item, not per pair
    state = copy.deepcopy(reads.state)
    observed = state.items
    first_seen = dict(reads.first_seen)
    similarity = vectors @ vectors.T
    postings = postings_of((str(r["item_id"]), r.get(SIGNALS)) for r in reads.keyed)
    keyed_rows = {str(r["item_id"]): r for r in reads.keyed}
    merges: list[tuple[list[str], str]] = []
    batch_decisions: list[decisions_pb2.Decision] = []
    for position, (index, item, pk) in enumerate(todo):
        candidates = [
            Candidate(h.fields["item_id"], h.score, h.fields["cluster_id"],
                      int(h.fields["ingest_ms"]),
                      exact=h.fields["content_hash"] == item.accepted.content_hash,
                      refused=_refused(h.fields["decision"]), signals=_stored_signals(h.fields))
            for h in reads.hits[position] if h.pk != pk
        ]
        if postings and reads.keys[position]:
            shared = shared_keys(reads.keys[position], postings)
            candidates = with_keyed(candidates, shared, partial(_keyed_candidate, keyed_rows, item, vectors[position]))
        candidates += [
            Candidate(r["item_id"], 1.0, r["cluster_id"], int(r["ingest_ms"]), exact=True)
            for r in reads.exact_rows
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
        decision = decide(item, candidates, group.bundle, neighbours, group.record_ms[index],
                          state.calibration, signals)
        linked = linked_clusters(decision, candidates)
        if len(linked) > 1:
            if missing := linked - first_seen.keys():
                first_seen.update((yield missing))
            winner = oldest_cluster(linked, first_seen, batch_decisions, todo)
            losers = sorted(linked - {winner})
            decision.cluster_id = winner
            decision.merged_clusters.extend(losers)
            merges.append((losers, winner))
            for earlier in batch_decisions:  # in-flight rows of merged clusters move too
                if earlier.cluster_id in losers:
                    earlier.cluster_id = winner
        batch_decisions.append(decision)
        out.append((index, decision, True))
        observed_item = observation(decision, candidates, signals)
        if observed_item is not None:
            state.observe(observed_item)
    rows = {index: _row(pk, item, decision, signals)
            for (index, item, pk), decision, signals in zip(todo, batch_decisions, own_signals, strict=True)}
    return IndexPlan(out, rows, merges, list(triaged.rejected),
                     state if state.items != observed else None)


def oldest_cluster(clusters: set[str], stored_first_seen: Mapping[str, FirstSeen | None],
                   batch: Sequence[decisions_pb2.Decision],
                   todo: Sequence[tuple[int, items_pb2.EmbeddedItem, str]]) -> str:
    """The cluster whose earliest member came first survives a merge (stable canonical)."""
    missing = clusters - stored_first_seen.keys()
    if missing:
        raise ClustersNeeded(missing)
    first_seen = {c: seen for c in clusters if (seen := stored_first_seen[c]) is not None}
    for decision, (_, item, _) in zip(batch, todo, strict=False):
        if decision.cluster_id in clusters:
            key = (item.accepted.ingest_time_ms, decision.item_id)
            first_seen[decision.cluster_id] = min(first_seen.get(decision.cluster_id, key), key)
    return min(clusters, key=lambda c: (first_seen.get(c, (2**62, c)), c))


def earliest_members(rows: Sequence[Mapping[str, Any]], clusters: set[str]) -> dict[str, FirstSeen | None]:
    """Each cluster's earliest member among stored ``rows`` (``cluster_id, item_id, ingest_ms``)."""
    first_seen: dict[str, FirstSeen | None] = dict.fromkeys(clusters)
    for row in rows:
        key = (int(row["ingest_ms"]), str(row["item_id"]))
        seen = first_seen.get(row["cluster_id"])
        first_seen[row["cluster_id"]] = key if seen is None else min(seen, key)
    return first_seen


def fence(plan: IndexPlan, written: Mapping[str, Mapping[str, Any]]) -> IndexPlan:
    """Fence for a zombie (paused past a rebalance while its successor went on): rows stored
    since the plan's reads (``written``: pk -> decision) win and their decisions are repeated,
    never overwritten."""
    since = {index: decode_decision(written[str(row["pk"])]["decision"])
             for index, row in plan.rows.items() if row["pk"] in written}
    if not since:
        return plan
    return replace(
        plan,
        decided=[(i, since.get(i, d), new and i not in since) for i, d, new in plan.decided],
        rows={i: row for i, row in plan.rows.items() if i not in since})


def outgoing(decided: Mapping[int, decisions_pb2.Decision], topic: str) -> list[Outgoing]:
    """The decisions to publish, in batch order (each keyed by its item's row)."""
    return [Outgoing(topic, row_key(d.tenant, d.collection, d.item_id).encode(), d.SerializeToString())
            for _, d in sorted(decided.items())]


def invalid(item: items_pb2.EmbeddedItem) -> str:
    """Why an embedded item cannot be indexed ("": it can)."""
    if not item.accepted.item.item_id or not item.accepted.item.tenant:
        return "the item has no id or tenant"
    if not item.vector:
        return "the item has no vector"
    if not np.all(np.isfinite(np.asarray(item.vector, dtype=np.float32))):
        return "the vector has NaN or infinite values"
    return ""


def _pk(item: items_pb2.EmbeddedItem) -> str:
    it = item.accepted.item
    return row_key(it.tenant, it.collection, it.item_id)


def _stored_signals(row: Mapping[str, Any]) -> dict[str, object] | None:
    """A stored item's signals (``None``: stored before signals existed, or it has none)."""
    signals = row.get(SIGNALS)
    return signals if isinstance(signals, dict) and signals else None


def _keyed_candidate(rows: Mapping[str, Mapping[str, Any]], item: items_pb2.EmbeddedItem,
                     vector: np.ndarray, item_id: str) -> Candidate | None:
    """A stored row (``rows``: by item id) sharing blocking keys with the item, scored by cosine
    as a Milvus hit is."""
    row = rows[item_id]
    if item_id == item.accepted.item.item_id:
        return None
    stored = np.asarray(row["vector"], dtype=np.float32)
    norms = float(np.linalg.norm(stored) * np.linalg.norm(vector))
    return Candidate(row["item_id"], float(stored @ vector) / norms if norms else 0.0, row["cluster_id"],
                     int(row["ingest_ms"]), exact=row["content_hash"] == item.accepted.content_hash,
                     refused=_refused(row["decision"]), signals=_stored_signals(row))


def _refused(stored: str) -> bool:
    """Whether a stored row was decided OUT_OF_DISTRIBUTION (its links never count)."""
    return decode_decision(stored).kind == decisions_pb2.OUT_OF_DISTRIBUTION


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
    """What later items are compared with beside the vector (records: only small ones), with a
    record's blocking keys."""
    if item.modality == items_pb2.RECORD and len(item.content) > MAX_SIGNAL_BYTES:
        return None
    return with_keys(item_signals(item))
