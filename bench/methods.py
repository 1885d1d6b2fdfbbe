"""The methods under comparison, each reduced to streaming links (see ``bench.metrics``).

* dense similarity (cosine of embeddings, Hamming similarity of perceptual hashes): the best
  earlier item by exact search over everything before it;
* MinHash LSH (``datasketch``): candidates from the LSH index, ranked by estimated Jaccard;
* twinstream: its encoder in-process and the indexer's own decision rule
  (``twinstream.indexing.decide``) over the exact top-k earlier neighbours and content hashes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from bench.metrics import Link
from twinstream.common.encoding import ItemEncoder, make_encoder
from twinstream.indexing.blocking import postings_of, query_keys, shared_keys, with_keyed, with_keys
from twinstream.indexing.calibration import CollectionState
from twinstream.indexing.decide import (
    DUPLICATE_KINDS,
    Candidate,
    compare_fields,
    decide,
    item_signals,
    linked_clusters,
    observation,
)
from twinstream.ingestion.validation import Limits, validate
from twinstream.model.bundle import ModelBundle
from twinstream.v1 import decisions_pb2, items_pb2

_TENANT = "bench"


def top_earlier(vectors: np.ndarray, k: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Indices and inner products of each row's ``k`` most similar earlier rows, best first
    (index -1 where fewer than ``k`` rows came before)."""
    n = len(vectors)
    index = np.full((n, k), -1, dtype=np.int64)
    score = np.full((n, k), -np.inf, dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = vectors[start:stop] @ vectors[:stop].T
        rows = np.arange(stop - start)[:, None]
        sims[np.arange(stop)[None, :] >= start + rows] = -np.inf  # only earlier items
        take = min(k, stop)
        part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        best_scores = np.take_along_axis(part_scores, order, axis=1)
        valid = np.isfinite(best_scores)
        index[start:stop, :take] = np.where(valid, best, -1)
        score[start:stop, :take] = best_scores
    return index, score


def dense_links(vectors: np.ndarray, entities: Sequence[str]) -> list[Link]:
    """Links to the most similar earlier item (no decision yet: see ``metrics.at_threshold``)."""
    index, score = top_earlier(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return [Link(entity, entities[j] if j >= 0 else None, float(s) if j >= 0 else -np.inf, False)
            for entity, j, s in zip(entities, index[:, 0], score[:, 0], strict=True)]


def bits_as_vectors(bits: np.ndarray) -> np.ndarray:
    """Hash bits [N, B] as +-1/sqrt(B) vectors: inner product = 1 - 2 * Hamming / B."""
    signs = np.where(bits.astype(bool), 1.0, -1.0).astype(np.float32)
    return signs / np.sqrt(bits.shape[1])


def shingles(text: str, size: int = 5) -> set[bytes]:
    """Character ``size``-grams of the lower-cased, whitespace-collapsed text."""
    norm = " ".join(text.lower().split())
    return {norm[i:i + size].encode() for i in range(max(1, len(norm) - size + 1))}


@dataclass(frozen=True)
class MinHashConfig:
    num_perm: int = 128
    shingle: int = 5
    lsh_threshold: float = 0.3  # candidate generation only; the decision threshold is calibrated

    def describe(self) -> str:
        return (f"datasketch MinHashLSH, {self.num_perm} permutations, character {self.shingle}-gram "
                f"shingles, LSH threshold {self.lsh_threshold} for candidates, ranked by estimated Jaccard")


def minhash_links(texts: Sequence[str], entities: Sequence[str], config: MinHashConfig) -> list[Link]:
    """Stream the texts through a MinHash LSH index: query, then insert, item by item."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=config.lsh_threshold, num_perm=config.num_perm)
    seen: list[MinHash] = []
    links = []
    for i, (text, entity) in enumerate(zip(texts, entities, strict=True)):
        sketch = MinHash(num_perm=config.num_perm, seed=1)
        sketch.update_batch(list(shingles(text, config.shingle)))
        scored = [(sketch.jaccard(seen[int(key)]), int(key)) for key in lsh.query(sketch)]
        if scored:
            best_score, best = max(scored, key=lambda pair: (pair[0], -pair[1]))
            links.append(Link(entity, entities[best], float(best_score), False))
        else:
            links.append(Link(entity, None, -np.inf, False))
        lsh.insert(str(i), sketch)
        seen.append(sketch)
    return links


# -- twinstream ---------------------------------------------------------------------------------
def load_encoder(bundle_dir: Path) -> ItemEncoder:
    """The bundle's encoder in this process (the bare encoder, no Triton, no pipeline)."""
    return make_encoder(ModelBundle.load(bundle_dir), "inprocess", "")


def encode_contents(encoder: ItemEncoder, modality: int, contents: Sequence[bytes],
                    batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess and encode item contents exactly as the embedding service does."""
    prepared = [encoder.model_input(modality, content) for content in contents]
    vectors, oods = [], []
    for start in range(0, len(prepared), batch):
        embedded = encoder.encode(prepared[start:start + batch])
        vectors.append(embedded.vectors)
        oods.append(embedded.ood_scores)
    return np.concatenate(vectors), np.concatenate(oods)


@dataclass(frozen=True)
class Stream:
    """Items in arrival order: ids, ground-truth entities, raw contents and their modality."""

    ids: list[str]
    entities: list[str]
    contents: list[bytes]
    modality: items_pb2.Modality.ValueType

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, i: int) -> items_pb2.Item:
        return items_pb2.Item(item_id=self.ids[i], tenant=_TENANT, collection="bench",
                              modality=self.modality, content=self.contents[i])

    def subset(self, keep: Sequence[int]) -> Stream:
        return Stream([self.ids[i] for i in keep], [self.entities[i] for i in keep],
                      [self.contents[i] for i in keep], self.modality)


def content_hashes(stream: Stream) -> list[str]:
    """The ingestion service's exact-duplicate keys."""
    limits = Limits(max_item_bytes=1 << 24, max_text_chars=1 << 20)
    return [validate(stream.item(i), limits) for i in range(len(stream))]


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray
    ood: np.ndarray
    hashes: list[str]


def embed_stream(encoder: ItemEncoder, stream: Stream) -> Embedded:
    vectors, ood = encode_contents(encoder, stream.modality, stream.contents)
    return Embedded(vectors, ood, content_hashes(stream))


@dataclass
class Replayed:
    """twinstream's decisions for a stream, and each item's cluster once the stream has passed
    (merges relabel earlier items, as ``VectorStore.relabel_clusters`` does)."""

    decisions: list[decisions_pb2.Decision]
    clusters: list[str]
    calibrations: int  # fits the collection went through (0: the bundle's thresholds decided)
    best: list[float] = field(default_factory=list)  # the best accepted neighbour's cosine (NaN: none), the OOD score


def replay(bundle: ModelBundle, stream: Stream, embedded: Embedded, neighbours: int = 10,
           calibrated: bool = True, single_link: bool = False, keyed: bool = True) -> Replayed:
    """The indexer's decision path, in process: the exact top-k earlier neighbours, the earlier
    records sharing blocking keys (``keyed``; an in-memory index stands in for the indexer's Milvus
    query, ``indexing.blocking``) and every earlier item with the same content hash, the
    collection's calibration (``calibrated``; else the bundle's thresholds) and the cluster rule
    (``single_link``: the old rule, for comparison)."""
    index, score = top_earlier(embedded.vectors, neighbours)
    model = bundle.model_ref
    first_with_hash: dict[str, int] = {}
    position = {item_id: i for i, item_id in enumerate(stream.ids)}
    clusters: list[str] = []
    refused: list[bool] = []
    state = CollectionState()
    decisions = []
    best: list[float] = []
    signals = [with_keys(item_signals(stream.item(i))) if calibrated else None for i in range(len(stream))]
    postings: dict[str, list[str]] = {}  # blocking key -> earlier item ids

    def candidate(i: int, j: int, score: float) -> Candidate:
        return Candidate(stream.ids[j], score, clusters[j], j, exact=embedded.hashes[j] == embedded.hashes[i],
                         refused=refused[j], signals=signals[j])

    def keyed_candidate(i: int, item_id: str) -> Candidate:
        j = position[item_id]
        return candidate(i, j, float(embedded.vectors[i] @ embedded.vectors[j]))

    for i in range(len(stream)):
        candidates = [candidate(i, int(j), float(s)) for j, s in zip(index[i], score[i], strict=True) if j >= 0]
        if keyed and signals[i] is not None:
            shared = shared_keys(query_keys(signals[i], state), postings)
            candidates = with_keyed(candidates, shared, partial(keyed_candidate, i))
        same = first_with_hash.get(embedded.hashes[i])
        if same is not None and all(c.item_id != stream.ids[same] for c in candidates):
            candidates.append(Candidate(stream.ids[same], 1.0, clusters[same], same, exact=True,
                                        refused=refused[same]))
        own = signals[i]
        if own is not None:
            candidates = compare_fields(own, candidates, state.field_names(own), state.calibration.fields)
        accepted = items_pb2.AcceptedItem(item=stream.item(i), content_hash=embedded.hashes[i],
                                          ingest_time_ms=i)
        item = items_pb2.EmbeddedItem(accepted=accepted, model=model, ood_score=float(embedded.ood[i]))
        decision = decide(item, candidates, bundle, neighbours, i, state.calibration if calibrated else None, own)
        linked = (_single_link if single_link else linked_clusters)(decision, candidates)
        if len(linked) > 1:  # the oldest cluster survives (canonical ids are first members)
            winner = min(linked, key=lambda c: (position.get(c, i), c))
            decision.cluster_id = winner
            decision.merged_clusters.extend(sorted(linked - {winner}))
            clusters = [winner if c in linked else c for c in clusters]
        decisions.append(decision)
        best.append(max((c.score for c in candidates if not c.refused), default=math.nan))
        clusters.append(decision.cluster_id)
        refused.append(decision.kind == decisions_pb2.OUT_OF_DISTRIBUTION)
        first_with_hash.setdefault(embedded.hashes[i], i)
        for key, ids in postings_of([(stream.ids[i], signals[i])]).items():
            postings.setdefault(key, []).extend(ids)
        seen = observation(decision, candidates, own)
        if calibrated and seen is not None:
            state.observe(seen)
    return Replayed(decisions, clusters, state.calibration.version, best)


def _single_link(decision: decisions_pb2.Decision, candidates: Sequence[Candidate]) -> set[str]:
    """The cluster rule before issue 16: every cluster linked at the duplicate threshold merges."""
    if decision.kind not in DUPLICATE_KINDS:
        return set()
    return {decision.cluster_id} | {c.cluster_id for c in candidates
                                    if c.exact or c.score >= decision.thresholds.duplicate}


def replay_decisions(bundle: ModelBundle, stream: Stream, embedded: Embedded,
                     neighbours: int = 10, calibrated: bool = False) -> list[decisions_pb2.Decision]:
    """twinstream's decisions for the stream (see ``replay``)."""
    return replay(bundle, stream, embedded, neighbours, calibrated).decisions


def decision_links(decisions: Sequence[decisions_pb2.Decision], entity_of: dict[str, str]) -> list[Link]:
    """Links from twinstream decisions (replayed or read off ``items.decisions``): the named
    earlier item for duplicates, else the top neighbour; the score of that link."""
    links = []
    for decision in decisions:
        entity = entity_of[decision.item_id]
        if decision.kind in DUPLICATE_KINDS:
            links.append(Link(entity, entity_of.get(decision.duplicate_of), decision.score, True))
        elif decision.neighbours:
            top = max(decision.neighbours, key=lambda n: n.score)
            links.append(Link(entity, entity_of.get(top.item_id), top.score, False))
        else:
            links.append(Link(entity, None, -np.inf, False))
    return links


def with_duplicate_threshold(bundle: ModelBundle, threshold: float) -> ModelBundle:
    """The bundle with another duplicate threshold for every kind it serves (the match threshold
    kept at most as high)."""
    by_modality = {kind: {**values, "duplicate": threshold, "match": min(values.get("match", threshold), threshold)}
                   for kind, values in bundle.by_modality.items()}
    return replace(bundle, duplicate_threshold=threshold, match_threshold=min(bundle.match_threshold, threshold),
                   by_modality=by_modality)


_SAFE_ID = re.compile(r"[^A-Za-z0-9_.:@+=-]")


def safe_id(text: str) -> str:
    """An item id the ingestion service accepts."""
    return _SAFE_ID.sub("_", text)[:256]
