from __future__ import annotations

import itertools

import numpy as np
import pytest

from twinstream.learn.calibration import (
    ValidationStream,
    alignment_uniformity,
    band_threshold,
    calibrate,
    fit_platt,
    ood_metrics,
    ood_thresholds,
    precision_recall_f1,
    roc_auc,
    stream_decisions,
    threshold_for_precision,
)


def test_roc_auc_matches_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert roc_auc(scores, labels) == pytest.approx(brute)


def test_threshold_for_precision_is_the_lowest_reaching_the_target() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([True, True, False, True, False])
    assert threshold_for_precision(scores, labels, 1.0) == 0.8
    assert threshold_for_precision(scores, labels, 0.75) == 0.6


def test_stream_decisions_and_demo_style_scoring() -> None:
    # a, b are one entity; c is alone; d duplicates c but its nearest earlier item is a.
    vectors = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.8, 0.6]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    decisions = stream_decisions(vectors, ["x", "x", "c", "c"])
    assert decisions.nearest_is_same.tolist() == [True, False, False]
    assert decisions.has_earlier_same.tolist() == [True, False, True]
    precision, recall, f1 = precision_recall_f1(decisions, threshold=0.75)
    assert (precision, recall) == (0.5, 0.5) and f1 == pytest.approx(0.5)


def test_platt_is_increasing_in_the_score() -> None:
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0.9, 0.05, 200), rng.normal(0.5, 0.1, 200)])
    labels = np.concatenate([np.ones(200, bool), np.zeros(200, bool)])
    a, b = fit_platt(scores, labels)
    assert a > 0 and 1 / (1 + np.exp(-(a * 0.95 + b))) > 0.9 > 0.1 > 1 / (1 + np.exp(-(a * 0.4 + b)))


def test_calibrate_orders_thresholds() -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(50, 16))
    vectors = np.concatenate([centres, centres[:25] + rng.normal(scale=0.3, size=(25, 16))])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    entities = [str(i) for i in range(50)] + [str(i) for i in range(25)]
    loose = vectors + rng.normal(scale=0.5, size=vectors.shape)  # a second kind, duplicates farther apart
    loose /= np.linalg.norm(loose, axis=1, keepdims=True)
    fitted = calibrate({"record": ValidationStream(vectors.astype(np.float32), entities, "tight"),
                        "text": ValidationStream(loose.astype(np.float32), entities, "loose")},
                       {"record": rng.random(100) * 0.1, "text": rng.random(100)})
    thresholds, calibration = fitted["thresholds"], fitted["calibration"]
    assert isinstance(thresholds, dict) and isinstance(calibration, dict)
    by_kind = thresholds["by_modality"]
    for kind in ("record", "text"):
        assert by_kind[kind]["match"] <= by_kind[kind]["duplicate"]
    assert by_kind["record"]["ood"] < by_kind["text"]["ood"]
    # the first kind is the primary one: its values are the top-level fields
    assert thresholds["duplicate"] == by_kind["record"]["duplicate"] and thresholds["ood"] == by_kind["record"]["ood"]
    assert calibration["platt_a"] == by_kind["record"]["platt_a"]
    assert calibration["true_duplicates"] == 25 and calibration["by_modality"]["text"]["data"] == "loose"


def test_ood_metrics_on_separated_and_identical_scores() -> None:
    inside = np.linspace(0, 1, 100)
    assert ood_metrics(inside, inside + 2) == {"auroc": 1.0, "fpr_at_95_tpr": 0.0, "fpr_at_99_tpr": 0.0}
    same = ood_metrics(inside, inside.copy())
    assert same["auroc"] == pytest.approx(0.5) and same["fpr_at_95_tpr"] == pytest.approx(0.95)
    assert same["fpr_at_99_tpr"] == pytest.approx(0.99)


def test_match_band_is_judged_on_its_own_decisions() -> None:
    # 60% of the stream are true duplicates: pooled, precision never falls below 0.5
    scores = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    labels = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert threshold_for_precision(scores, labels, 0.5) == pytest.approx(0.2)
    # below the duplicate threshold 0.8 the band keeps precision >= 0.5 down to 0.4 (2 of 4 true)
    assert band_threshold(scores, labels, 0.8, 0.5) == pytest.approx(0.4)
    assert band_threshold(scores, labels, 0.1, 0.5) == pytest.approx(0.1)  # nothing below: empty band


def test_each_kind_gets_an_ood_threshold_that_keeps_its_tpr() -> None:
    tight, loose = np.linspace(0.0, 0.1, 1000), np.linspace(0.0, 0.5, 100)
    thresholds = ood_thresholds({"record": tight, "text": loose})
    assert (loose <= thresholds["text"]).mean() >= 0.99 and (tight <= thresholds["record"]).mean() >= 0.99
    assert thresholds["record"] < 0.11 < thresholds["text"]
    pooled = float(np.quantile(np.concatenate([tight, loose]), 0.99))
    assert (loose <= pooled).mean() < 0.9  # why kinds are not pooled


def test_alignment_and_uniformity() -> None:
    tight = np.array([[1, 0], [1, 0], [-1, 0], [-1, 0]], dtype=np.float32)
    alignment, uniformity = alignment_uniformity(tight, ["a", "a", "b", "b"])
    assert alignment == pytest.approx(0.0, abs=1e-6)
    # pairs: 2 at distance^2 0 and 4 at 4 -> log((2 + 4 e^-8) / 6)
    assert uniformity == pytest.approx(np.log((2 + 4 * np.exp(-8)) / 6), rel=1e-5)
