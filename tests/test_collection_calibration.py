"""Per-collection calibration (indexing/calibration.py): fitted on the collection's own stream."""

from __future__ import annotations

import math
import random

import pytest
from test_decide import BUNDLE, embedded

from twinstream.indexing.calibration import (
    WARMUP_ITEMS,
    Calibration,
    CollectionState,
    Observation,
    fdr_threshold,
    next_fit,
)
from twinstream.indexing.decide import Candidate, decide
from twinstream.v1 import decisions_pb2


def dedup_stream(items: int, duplicates: float, seed: int = 1) -> list[Observation]:
    """Best-neighbour and decoy scores of a collection: duplicates score near 0.95, the best
    non-duplicate of any item (and every decoy) between 0.55 and 0.8."""
    rng = random.Random(seed)
    out = []
    for _ in range(items):
        best = rng.uniform(0.9, 0.99) if rng.random() < duplicates else rng.uniform(0.55, 0.8)
        out.append(Observation(best, rng.uniform(0.5, 0.78)))
    return out


def fed(observations: list[Observation]) -> CollectionState:
    state = CollectionState()
    for seen in observations:
        state.observe(seen)
    return state


def test_a_new_collection_refuses_nothing_during_warm_up() -> None:
    # the bundle's detector says OOD (0.9 > 0.5) and the best neighbour is far: still not refused
    decision = decide(embedded(ood=0.9), [Candidate("a", 0.1, "a", 10)], BUNDLE, 3, 5, Calibration())
    assert decision.kind == decisions_pb2.NOVEL
    assert decision.calibration.version == 0 and decision.thresholds.ood_similarity == -math.inf


def test_the_collection_fits_after_warm_up_and_refits_as_it_doubles() -> None:
    stream = dedup_stream(4 * WARMUP_ITEMS, 0.3)
    assert fed(stream[:WARMUP_ITEMS - 1]).calibration.version == 0
    state = fed(stream[:WARMUP_ITEMS])
    assert state.calibration.version == 1 and state.calibration.fitted_on == WARMUP_ITEMS
    assert next_fit(state.calibration) == 2 * WARMUP_ITEMS
    assert fed(stream).calibration.version == 3  # at 50, 100 and 200 items


def test_the_duplicate_threshold_separates_duplicates_from_the_best_non_duplicates() -> None:
    fitted = fed(dedup_stream(1000, 0.3)).calibration
    assert 0.78 <= fitted.duplicate <= 0.9
    assert fitted.match <= fitted.duplicate


def test_a_collection_without_duplicates_calls_none() -> None:
    assert fed(dedup_stream(1000, 0.0)).calibration.duplicate > 0.78


def test_the_thresholds_decide_once_fitted() -> None:
    fitted = fed(dedup_stream(1000, 0.3)).calibration
    # 0.85 is below the bundle's duplicate threshold (0.9) but above the collection's
    decision = decide(embedded(), [Candidate("a", 0.85, "a", 10)], BUNDLE, 3, 5, fitted)
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE
    assert decision.calibration.version == fitted.version
    assert decision.thresholds.duplicate == pytest.approx(fitted.duplicate)


def test_an_item_unlike_the_collection_is_refused_once_fitted() -> None:
    fitted = fed(dedup_stream(1000, 0.3)).calibration
    # the bundle's detector finds nothing wrong (0.1 < 0.5): the collection's reference decides
    far = decide(embedded(ood=0.1), [Candidate("a", 0.2, "a", 10)], BUNDLE, 3, 5, fitted)
    usual = decide(embedded(ood=0.9), [Candidate("a", 0.6, "a", 10)], BUNDLE, 3, 5, fitted)
    assert far.kind == decisions_pb2.OUT_OF_DISTRIBUTION
    assert usual.kind in (decisions_pb2.NOVEL, decisions_pb2.MATCH)


def test_in_distribution_items_are_rarely_refused() -> None:
    fitted = fed(dedup_stream(1000, 0.3)).calibration
    fresh = dedup_stream(1000, 0.3, seed=2)
    refused = sum(s.best < fitted.ood_floor for s in fresh)
    assert refused <= 20


def test_a_refused_neighbour_is_never_the_target_of_a_duplicate() -> None:
    decision = decide(embedded(), [Candidate("a", 0.99, "a", 10, refused=True), Candidate("b", 0.5, "b", 11)],
                      BUNDLE, 3, 5)
    assert decision.kind == decisions_pb2.NOVEL and decision.duplicate_of == ""


def test_the_state_reads_back_identically() -> None:
    state = fed([*dedup_stream(2100, 0.3), Observation(math.nan, math.nan)])
    again = CollectionState.from_json(state.to_json())
    assert again.to_json() == state.to_json() and again.calibration == state.calibration
    assert len(state.to_json()) < 65535


def test_fdr_threshold_is_infinite_without_enough_targets() -> None:
    import numpy as np

    assert fdr_threshold(np.array([0.9, 0.8]), np.array([0.1]), 0.05) == math.inf
