"""Scores shared by every quality benchmark.

Every method, baseline or twinstream, is reduced to the same thing: for each item of a stream
(in arrival order) the best earlier item it links to, the score of that link, and whether it
calls the item a duplicate. Scored like the demo: a duplicate call is right when the earlier
item it names is the same entity; recall is over the items that have an earlier duplicate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

TARGET_PRECISION = 0.95  # the rule twinstream calibrates its duplicate threshold with


@dataclass(frozen=True)
class Link:
    """One streamed item: its entity, the entity of the best earlier candidate a method found
    (None: no candidate), that link's score, and whether the method calls it a duplicate."""

    entity: str
    candidate: str | None
    score: float
    duplicate: bool


@dataclass(frozen=True)
class Quality:
    precision: float
    recall: float
    f1: float
    micro_ap: float
    duplicates_said: int
    true_duplicates: int
    items: int


def has_earlier(entities: Sequence[str]) -> list[bool]:
    """For each item, whether an earlier item of the stream shows the same entity."""
    seen: set[str] = set()
    out = []
    for entity in entities:
        out.append(entity in seen)
        seen.add(entity)
    return out


def quality(links: Sequence[Link]) -> Quality:
    """Precision, recall and F1 of the duplicate calls, and the threshold-free micro-AP."""
    truth = has_earlier([link.entity for link in links])
    said = [link.duplicate and link.candidate is not None for link in links]
    correct = [s and link.candidate == link.entity for s, link in zip(said, links, strict=True)]
    tp, n_said, n_true = sum(correct), sum(said), sum(truth)
    precision = tp / n_said if n_said else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Quality(precision, recall, f1, micro_ap(links), n_said, n_true, len(links))


def micro_ap(links: Sequence[Link]) -> float:
    """Micro-average precision (DISC21's µAP, one prediction per query): every item's best earlier
    candidate, all queries pooled and ranked by score; normalised by the true duplicates."""
    n_true = sum(has_earlier([link.entity for link in links]))
    ranked = sorted((link for link in links if link.candidate is not None), key=lambda x: -x.score)
    if not n_true or not ranked:
        return 0.0
    hits = np.array([link.candidate == link.entity for link in ranked], dtype=np.float64)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / n_true)


def at_threshold(links: Sequence[Link], threshold: float) -> list[Link]:
    """The same links, deciding "duplicate" exactly when the score reaches ``threshold``."""
    return [replace(link, duplicate=link.candidate is not None and link.score >= threshold)
            for link in links]


def calibrate_threshold(links: Sequence[Link], target: float = TARGET_PRECISION) -> float:
    """The lowest score threshold whose duplicate calls reach ``target`` precision: the rule
    twinstream's own calibration uses, applied to a validation stream of any method."""
    ranked = sorted((link for link in links if link.candidate is not None), key=lambda x: -x.score)
    if not ranked:
        return math.inf
    hits = np.array([link.candidate == link.entity for link in ranked], dtype=np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    ok = np.nonzero(precision >= target)[0]
    if len(ok) == 0:
        return ranked[0].score + 1e-6
    return float(ranked[int(ok.max())].score)


def pr_curve(links: Sequence[Link], points: int = 200) -> tuple[list[float], list[float]]:
    """(recall, precision) of the duplicate calls as the threshold sweeps down the scores."""
    n_true = sum(has_earlier([link.entity for link in links]))
    ranked = sorted((link for link in links if link.candidate is not None), key=lambda x: -x.score)
    if not n_true or not ranked:
        return [], []
    hits = np.array([link.candidate == link.entity for link in ranked], dtype=np.float64)
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_true
    keep = np.unique(np.linspace(0, len(hits) - 1, min(points, len(hits))).astype(int))
    return recall[keep].round(4).tolist(), precision[keep].round(4).tolist()


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> list[float]:
    """Percentiles of ``values`` (NaN when there are none)."""
    if not len(values):
        return [math.nan for _ in qs]
    return [float(np.percentile(np.asarray(values, dtype=np.float64), q)) for q in qs]


@dataclass(frozen=True)
class ClusterQuality:
    """Pairwise quality of the final dedup clusters: a pair of items is called a duplicate when
    they share a cluster, and is one when they show the same entity."""

    precision: float
    recall: float
    f1: float
    largest_cluster: int
    largest_entity: int


def cluster_quality(clusters: Sequence[str], entities: Sequence[str]) -> ClusterQuality:
    from collections import Counter

    def pairs(counts: Counter[object]) -> int:
        return sum(n * (n - 1) // 2 for n in counts.values())

    by_cluster: Counter[object] = Counter(clusters)
    by_entity: Counter[object] = Counter(entities)
    said, true = pairs(by_cluster), pairs(by_entity)
    tp = pairs(Counter(zip(clusters, entities, strict=True)))
    precision = tp / said if said else 0.0
    recall = tp / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ClusterQuality(precision, recall, f1, max(by_cluster.values(), default=0),
                          max(by_entity.values(), default=0))
