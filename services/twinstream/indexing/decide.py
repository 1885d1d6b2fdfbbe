"""The decision rule, as a pure function of an item, the earlier items near it and the
collection's own calibration (``indexing.calibration``); and the cluster rule."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from twinstream.indexing.calibration import (
    IMAGE_SIGNALS,
    Calibration,
    FieldModel,
    Observation,
    compare,
    image_prior,
    image_signals,
    text_signals,
    warm_up_model,
)
from twinstream.indexing.profile import of_signals
from twinstream.model.bundle import ModelBundle
from twinstream.model.images import load_image
from twinstream.v1 import decisions_pb2, items_pb2

DUPLICATE_KINDS = (decisions_pb2.EXACT_DUPLICATE, decisions_pb2.NEAR_DUPLICATE)


@dataclass(frozen=True)
class Candidate:
    """An earlier item near the one being decided (from Milvus or from the same batch)."""

    item_id: str
    score: float
    cluster_id: str
    ingest_time_ms: int
    exact: bool = False
    in_flight: bool = False
    refused: bool = False  # decided OUT_OF_DISTRIBUTION: never a duplicate's or a match's target
    # what it is compared on beside the vector: a record's fields, a text's MinHash signature
    signals: Mapping[str, object] | None = field(default=None, compare=False)
    pattern: str = ""  # comparison levels with the item being decided
    probability: float = math.nan  # P(duplicate) from the collection's pair model; NaN: none

    def links(self, thresholds: decisions_pb2.Thresholds) -> bool:
        """Whether this candidate is a duplicate of the item: by the field model where it
        scored the pair, else by the cosine threshold."""
        if self.exact or self.refused:
            return self.exact
        if not math.isnan(self.probability):
            return self.probability >= 0.5
        return self.score >= thresholds.duplicate


def item_signals(item: items_pb2.Item) -> dict[str, object] | None:
    """What an item is compared on beside its vector: a record's fields, a text's MinHash
    signature, an image's perceptual hashes (``None`` for a record that is not a JSON object)."""
    if item.modality == items_pb2.TEXT:
        return text_signals(item.content.decode("utf-8", errors="replace"))
    if item.modality == items_pb2.IMAGE:
        return decoded_image_signals(item.content)
    if item.modality != items_pb2.RECORD:
        return None
    try:
        record = json.loads(item.content)
    except ValueError:
        return None
    return {"fields": record} if isinstance(record, dict) else None


def decoded_image_signals(content: bytes) -> dict[str, object] | None:
    """An image's perceptual hashes (``None`` if it does not decode: ingestion let it through,
    so the cosine alone decides it)."""
    try:
        return image_signals(load_image(content))
    except ValueError:
        return None


def compare_fields(signals: Mapping[str, object] | None, candidates: Sequence[Candidate], fields: Sequence[str],
                   model: FieldModel | None) -> list[Candidate]:
    """The candidates with their comparison pattern and, where the collection has a pair model
    for these signals, its P(duplicate) (before its first fit: ``warm_up_model``'s)."""
    if signals is None or not fields:
        return list(candidates)
    usable = model if model is not None and model.fields == tuple(fields) else None
    if usable is None:
        usable = warm_up_model(fields)
    out = []
    for c in candidates:
        if c.signals is None or c.exact or c.refused:
            out.append(c)
            continue
        pattern = compare(signals, c.signals, c.score, fields)
        if not pattern:  # not the kind of item this collection compares: the cosine decides
            out.append(c)
            continue
        out.append(replace(c, pattern=pattern,
                           probability=usable.probability(pattern) if usable else math.nan))
    return out if usable is not None else with_image_prior(signals, out, fields)


def with_image_prior(signals: Mapping[str, object], candidates: Sequence[Candidate],
                     fields: Sequence[str]) -> list[Candidate]:
    """Before an image collection's pair model is fitted, a near-identical pHash links a pair
    (``calibration.image_prior``); other pairs are left to the cosine threshold. Chosen by
    measurement: it lifts the warm-up, where most of a short stream is decided (docs/calibration.md)."""
    if tuple(fields) != IMAGE_SIGNALS:
        return list(candidates)
    return [replace(c, probability=image_prior(signals, c.signals)) if c.pattern and c.signals is not None else c
            for c in candidates]


def decide(item: items_pb2.EmbeddedItem, candidates: Sequence[Candidate], bundle: ModelBundle,
           max_neighbours: int, decided_time_ms: int,
           calibration: Calibration | None = None,
           signals: Mapping[str, object] | None = None) -> decisions_pb2.Decision:
    """Exact duplicate > out-of-distribution > near duplicate > match > novel.

    Exact duplicates rest on the content hash, not the encoder, so they hold even for OOD
    items; OOD items are never forced into a (near-)match. With a collection ``calibration``
    its thresholds decide and OOD means "unlike this collection" (best neighbour below its
    floor, a text or image whose content profile is farther from the collection's than its
    limit: ``profile_distance``, or a record sharing none of the fields its pair model compares:
    ``foreign_record``; nothing is refused during warm-up); the bundle's thresholds for the item's modality are only
    the prior (warm-up) and decide alone without one. The decision carries them. ``signals``:
    the item's own (``item_signals``), where the caller has them.
    """
    accepted = item.accepted
    bundle = bundle.for_modality(accepted.item.modality)
    ranked = sorted(candidates, key=lambda c: (-c.score, c.ingest_time_ms, c.item_id))
    thresholds = bundle.thresholds
    if calibration is not None:
        if calibration.warm:
            thresholds = decisions_pb2.Thresholds(duplicate=calibration.duplicate, match=calibration.match,
                                                  ood=bundle.ood_threshold, ood_similarity=calibration.ood_floor)
        else:
            thresholds.ood_similarity = -math.inf
    distance, thresholds.ood_profile = profile_distance(signals, calibration)
    decision = decisions_pb2.Decision(
        item_id=accepted.item.item_id,
        tenant=accepted.item.tenant,
        collection=accepted.item.collection,
        thresholds=thresholds,
        model=item.model,
        ood_score=item.ood_score,
        content_hash=accepted.content_hash,
        ingest_time_ms=accepted.ingest_time_ms,
        decided_time_ms=decided_time_ms,
        modality=accepted.item.modality,
        cluster_id=accepted.item.item_id,
        profile_distance=0.0 if math.isnan(distance) else distance,
    )
    scored = [c for c in ranked if not c.exact and not c.refused and not math.isnan(c.probability)]
    if calibration is not None:
        decision.calibration.CopyFrom(decisions_pb2.Calibration(
            version=calibration.version, fitted_on_items=calibration.fitted_on,
            source="collection" if calibration.warm else "bundle prior (warm-up)",
            record_fields=bool(scored)))
    for c in ranked[:max_neighbours]:
        add_neighbour(decision, c)
    exact = sorted((c for c in candidates if c.exact), key=lambda c: (c.ingest_time_ms, c.item_id))
    if exact:
        first = exact[0]
        decision.kind = decisions_pb2.EXACT_DUPLICATE
        decision.duplicate_of = first.item_id
        decision.cluster_id = first.cluster_id
        decision.score = 1.0
        decision.duplicate_probability = 1.0
        show_named(decision, first)
        return decision
    accepted_ranked = [c for c in ranked if not c.refused]
    best = accepted_ranked[0] if accepted_ranked else None
    if best is not None:
        decision.score = best.score
        decision.duplicate_probability = bundle.duplicate_probability(best.score)
    if calibration is None:
        refused = item.ood_score > bundle.ood_threshold
    else:
        refused = ((best is not None and best.score < thresholds.ood_similarity)
                   or distance > thresholds.ood_profile
                   or (calibration.warm and foreign_record(signals, calibration.fields)))
    if refused:
        decision.kind = decisions_pb2.OUT_OF_DISTRIBUTION
        return decision
    if scored:  # the collection's field model decides records
        top = max(scored, key=lambda c: (c.probability, c.score))
        if top.links(thresholds):
            decision.kind = decisions_pb2.NEAR_DUPLICATE
            decision.duplicate_of = top.item_id
            decision.cluster_id = top.cluster_id
            decision.score = top.score
            decision.duplicate_probability = top.probability
            show_named(decision, top)
            return decision
        decision.duplicate_probability = top.probability
    if best is None or best.score < thresholds.match:
        decision.kind = decisions_pb2.NOVEL
        return decision
    decision.duplicate_of = best.item_id
    show_named(decision, best)
    if scored:
        decision.kind = decisions_pb2.MATCH
        return decision
    if best.score >= thresholds.duplicate:
        decision.kind = decisions_pb2.NEAR_DUPLICATE
        decision.cluster_id = best.cluster_id
    else:
        decision.kind = decisions_pb2.MATCH
    return decision


def show_named(decision: decisions_pb2.Decision, named: Candidate) -> None:
    """List the candidate a decision names among its neighbours when the cosine top k left it
    out (a keyed candidate, found by its fields: ``indexing.blocking``), last, so that the
    explanation shows what the item was linked to; the list stays at most one longer."""
    if all(n.item_id != named.item_id for n in decision.neighbours):
        add_neighbour(decision, named)


def add_neighbour(decision: decisions_pb2.Decision, c: Candidate) -> None:
    """Append ``c`` to the decision's neighbours, with its comparison and P(duplicate)."""
    decision.neighbours.add(item_id=c.item_id, score=c.score, cluster_id=c.cluster_id, in_flight=c.in_flight,
                            exact=c.exact, comparison=c.pattern,
                            duplicate_probability=0.0 if math.isnan(c.probability) else c.probability)


def observation(decision: decisions_pb2.Decision, candidates: Sequence[Candidate],
                signals: Mapping[str, object] | None = None) -> Observation | None:
    """What a decided item tells its collection's calibration (``None``: nothing, for exact
    duplicates and refused items): its best neighbour, its best from another cluster and its
    content profile (from its ``signals``)."""
    if decision.kind in (decisions_pb2.EXACT_DUPLICATE, decisions_pb2.OUT_OF_DISTRIBUTION):
        return None
    profile = of_signals(signals)
    near = sorted((c for c in candidates if not c.exact and not c.refused),
                  key=lambda c: (-c.score, c.ingest_time_ms, c.item_id))
    if not near:
        return Observation(math.nan, math.nan, profile=profile)
    decoys = [c.score for c in near[1:] if c.cluster_id != near[0].cluster_id]
    return Observation(near[0].score, decoys[0] if decoys else math.nan,
                       tuple(c.pattern for c in near if c.pattern), profile)


CROWDED_NEIGHBOURS = 3  # an image cluster showing more of its members among an image's neighbours takes no more


def uncrowded(candidates: Sequence[Candidate]) -> list[Candidate]:
    """An image's candidates without the clusters that crowd its neighbourhood (more than
    ``CROWDED_NEIGHBOURS`` members among its neighbours; exact copies stay). Such a cluster is a
    blob of look-alikes, not a copy set: copies that one transformation dominates (a screenshot
    frame, a caption bar) agree in cosine, pHash and dHash whatever they show, and joining one
    asserts a pair with every member. On the unseen icons this cut the largest cluster from 22
    items to 8 and raised cluster pair precision from 0.23 to 0.43 (docs/calibration.md)."""
    seen = neighbours_per_cluster(candidates)
    return [c for c in candidates if c.exact or seen.get(c.cluster_id, 0) <= CROWDED_NEIGHBOURS]


def neighbours_per_cluster(candidates: Sequence[Candidate]) -> dict[str, int]:
    """How many of the item's neighbours each cluster shows (exact copies and refused items
    left out)."""
    seen: dict[str, int] = {}
    for c in candidates:
        if not c.exact and not c.refused:
            seen[c.cluster_id] = seen.get(c.cluster_id, 0) + 1
    return seen


def linked_clusters(decision: decisions_pb2.Decision, candidates: Sequence[Candidate]) -> set[str]:
    """The clusters a duplicate joins and merges; sets ``decision.cluster_id`` to the one it joins.

    Join: a cluster takes the item only when it links to the cluster's canonical item (the one
    whose id the cluster bears), not merely to some member; a link is the pair model's
    P(duplicate) >= 0.5 where it scored the pair, else the cosine at the decision's duplicate
    threshold. So a chain A~B~C~... cannot pull a whole collection into one cluster.
    Merge: an item linking to the canonical items of several clusters merges them only when each
    of them shows a single item, its canonical, among the item's neighbours. That mends a pair the
    stream missed (A and B both novel, then C links to both) but never fuses two grown clusters on
    one item's word: their |A|·|B| cross pairs would rest on one link, and on the bench streams
    such merges added more false pairs than true ones (docs/calibration.md).
    An item that links to no canonical item keeps its own cluster (its pairwise decision, and
    the neighbour it names, stand). Exact copies join and merge only their copies' clusters.
    Items not decided as duplicates (OOD, match, novel) never join or merge anything, and links
    to refused (OOD) items do not count. A near-duplicate image has a stricter rule
    (``image_cluster``): no crowding cluster, no cluster outdone in its links, no merge.
    """
    if decision.kind not in DUPLICATE_KINDS:
        return set()
    if decision.modality == items_pb2.IMAGE and decision.kind == decisions_pb2.NEAR_DUPLICATE:
        return image_cluster(decision, candidates)
    exact = {c.cluster_id for c in candidates if c.exact}
    if decision.kind == decisions_pb2.EXACT_DUPLICATE:  # its copy already made its links
        return {decision.cluster_id} | exact
    seen = neighbours_per_cluster(candidates)
    links = links_of(decision, candidates)
    canonical = {c.cluster_id for c in links if c.item_id == c.cluster_id}
    if decision.cluster_id not in canonical:
        decision.cluster_id = best_linked(canonical, links) or decision.item_id
    if decision.cluster_id == decision.item_id:
        return set()
    if seen[decision.cluster_id] > 1:
        return {decision.cluster_id}
    return {cluster for cluster in canonical if seen[cluster] == 1}


def image_cluster(decision: decisions_pb2.Decision, candidates: Sequence[Candidate]) -> set[str]:
    """The cluster a near-duplicate image joins (a set of one, or empty: its own); sets
    ``decision.cluster_id``. Stricter than the rule for records and text, by measurement on both
    image sets (docs/calibration.md): copies that one augly transformation dominates look alike
    to the cosine, pHash and dHash whatever they show, so an image's links are often right about
    the look and wrong about the picture, and a join asserts a pair with every member.

    * It joins the cluster of the best-linked canonical item (as ``linked_clusters``), among the
      clusters that do not crowd its neighbourhood (``uncrowded``), only when no other cluster
      holds more of its links (``holds_most_links``; all its neighbours counted): an image that
      links more to a blob of look-alikes elsewhere says nothing about which one it belongs to.
    * It merges nothing: on the bench's image streams four of five merges of lone canonical
      items fused different pictures.
    Its pairwise decision (``duplicate_of``) stands either way.
    """
    links = links_of(decision, candidates)
    kept = {c.cluster_id for c in uncrowded(candidates)}
    canonical = {c.cluster_id for c in links if c.item_id == c.cluster_id and c.cluster_id in kept}
    joined = decision.cluster_id if decision.cluster_id in canonical else best_linked(canonical, links)
    if joined is None or not holds_most_links(joined, links):
        decision.cluster_id = decision.item_id
        return set()
    decision.cluster_id = joined
    return {joined}


def links_of(decision: decisions_pb2.Decision, candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates the item links to at the decision's thresholds; exact copies (their own
    rule) and refused (OOD) items never count."""
    return [c for c in candidates if not c.exact and not c.refused and c.links(decision.thresholds)]


def best_linked(clusters: Iterable[str], links: Sequence[Candidate]) -> str | None:
    """Of ``clusters``, the one holding the item's best-scoring link (ties: the smaller id);
    ``None`` when there is none."""
    return min(clusters, key=lambda k: (-max(c.score for c in links if c.cluster_id == k), k), default=None)


def holds_most_links(cluster: str, links: Sequence[Candidate]) -> bool:
    """Whether no other cluster holds more of an item's ``links`` than ``cluster`` does."""
    per_cluster = Counter(c.cluster_id for c in links)
    return all(n <= per_cluster[cluster] for k, n in per_cluster.items() if k != cluster)


def foreign_record(signals: Mapping[str, object] | None, model: FieldModel | None) -> bool:
    """Whether a record shares none of the fields the collection's pair model compares (a
    snippet of code sent as ``{"source": ...}`` into a collection of books): whatever its
    vector's nearest neighbour, nothing of it can be compared with the collection's items.
    Only once the collection has a fitted model (its fields are known); text and images never."""
    record = signals.get("fields") if signals else None
    if model is None or not isinstance(record, dict) or not record:
        return False
    return not {str(name) for name in record} & set(model.fields)


def profile_distance(signals: Mapping[str, object] | None, calibration: Calibration | None) -> tuple[float, float]:
    """The item's content-profile distance to its collection's reference and the limit it is
    refused above (``indexing.profile``); (NaN, +inf) where none applies: no calibration, its
    warm-up, no reference (records), or a profile of another kind than the reference's."""
    if calibration is None or not calibration.warm or calibration.profile is None:
        return math.nan, math.inf
    distance = calibration.profile.distance(of_signals(signals))
    return (distance, calibration.profile.limit) if not math.isnan(distance) else (math.nan, math.inf)
