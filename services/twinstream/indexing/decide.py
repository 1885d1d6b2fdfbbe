"""The decision rule, as a pure function of an item and the earlier items near it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twinstream.common.bundle import ModelBundle
from twinstream.v1 import decisions_pb2, items_pb2


@dataclass(frozen=True)
class Candidate:
    """An earlier item near the one being decided (from Milvus or from the same batch)."""

    item_id: str
    score: float
    cluster_id: str
    ingest_time_ms: int
    exact: bool = False
    in_flight: bool = False


def decide(item: items_pb2.EmbeddedItem, candidates: Sequence[Candidate], bundle: ModelBundle,
           max_neighbours: int, decided_time_ms: int) -> decisions_pb2.Decision:
    """Exact duplicate > out-of-distribution > near duplicate > match > novel.

    Exact duplicates rest on the content hash, not the encoder, so they hold even for OOD
    items; OOD items are never forced into a (near-)match. Thresholds and Platt scaling are the
    ones the bundle calibrated for the item's modality; the decision carries them.
    """
    accepted = item.accepted
    bundle = bundle.for_modality(accepted.item.modality)
    ranked = sorted(candidates, key=lambda c: (-c.score, c.ingest_time_ms, c.item_id))
    decision = decisions_pb2.Decision(
        item_id=accepted.item.item_id,
        tenant=accepted.item.tenant,
        collection=accepted.item.collection,
        thresholds=bundle.thresholds,
        model=item.model,
        ood_score=item.ood_score,
        content_hash=accepted.content_hash,
        ingest_time_ms=accepted.ingest_time_ms,
        decided_time_ms=decided_time_ms,
        modality=accepted.item.modality,
        cluster_id=accepted.item.item_id,
    )
    for c in ranked[:max_neighbours]:
        decision.neighbours.add(item_id=c.item_id, score=c.score, cluster_id=c.cluster_id,
                                in_flight=c.in_flight, exact=c.exact)
    exact = sorted((c for c in candidates if c.exact), key=lambda c: (c.ingest_time_ms, c.item_id))
    if exact:
        first = exact[0]
        decision.kind = decisions_pb2.EXACT_DUPLICATE
        decision.duplicate_of = first.item_id
        decision.cluster_id = first.cluster_id
        decision.score = 1.0
        decision.duplicate_probability = 1.0
        return decision
    best = ranked[0] if ranked else None
    if best is not None:
        decision.score = best.score
        decision.duplicate_probability = bundle.duplicate_probability(best.score)
    if item.ood_score > bundle.ood_threshold:
        decision.kind = decisions_pb2.OUT_OF_DISTRIBUTION
        return decision
    if best is None or best.score < bundle.match_threshold:
        decision.kind = decisions_pb2.NOVEL
        return decision
    decision.duplicate_of = best.item_id
    if best.score >= bundle.duplicate_threshold:
        decision.kind = decisions_pb2.NEAR_DUPLICATE
        decision.cluster_id = best.cluster_id
    else:
        decision.kind = decisions_pb2.MATCH
    return decision
