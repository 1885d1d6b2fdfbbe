"""Streaming decisions, thresholds for a target precision, Platt scaling, and the quality
metrics computed on them. Pure numpy: the same code scores base and trained encoders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DUPLICATE_PRECISION = 0.95  # the duplicate threshold is the lowest cosine reaching this precision
MATCH_PRECISION = 0.5       # the match band below the duplicate threshold: "worth a look", half of it true
OOD_TPR = 0.95              # reported: FPR at 95% TPR (the literature's yardstick)
OOD_SERVING_TPR = 0.99      # served: the OOD threshold keeps 99% of held-out in-distribution inputs


@dataclass(frozen=True)
class StreamDecisions:
    """What the indexer decides on: for each item after the first (in arrival order), the cosine
    to its nearest earlier item, whether that item is the same entity, and whether any earlier
    item is (a true duplicate the decision should find)."""

    scores: np.ndarray
    nearest_is_same: np.ndarray
    has_earlier_same: np.ndarray


def stream_decisions(vectors: np.ndarray, entities: list[str], block: int = 512) -> StreamDecisions:
    n = len(vectors)
    scores = np.full(n, -1.0, dtype=np.float32)
    nearest_is_same = np.zeros(n, dtype=bool)
    has_earlier_same = np.zeros(n, dtype=bool)
    seen: set[str] = set()
    for start in range(0, n, block):
        sims = vectors[start:start + block] @ vectors[: start + block].T
        for row in range(sims.shape[0]):
            i = start + row
            has_earlier_same[i] = entities[i] in seen
            seen.add(entities[i])
            if i == 0:
                continue
            j = int(np.argmax(sims[row, :i]))
            scores[i] = sims[row, j]
            nearest_is_same[i] = entities[j] == entities[i]
    return StreamDecisions(scores[1:], nearest_is_same[1:], has_earlier_same[1:])


def threshold_for_precision(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The lowest threshold whose decisions (score >= t) reach ``target`` precision."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    precision = np.cumsum(sorted_labels) / np.arange(1, len(sorted_labels) + 1)
    ok = np.nonzero(precision >= target)[0]
    if len(ok) == 0:
        return float(sorted_scores[0]) + 1e-6
    return float(sorted_scores[ok.max()])


def band_threshold(scores: np.ndarray, labels: np.ndarray, upper: float, target: float) -> float:
    """The lowest threshold t whose band [t, ``upper``) still has ``target`` precision: the band
    is judged on its own decisions, not together with the surer ones above it (pooled, a stream
    where most items have a duplicate reaches any precision below its base rate at every t)."""
    below = scores < upper
    if not below.any():
        return upper
    return min(upper, threshold_for_precision(scores[below], labels[below], target))


def fit_platt(scores: np.ndarray, labels: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """Logistic regression p = sigmoid(a*s + b) by Newton's method (L2-regularised a little)."""
    x = np.stack([scores.astype(np.float64), np.ones(len(scores))], axis=1)
    y = labels.astype(np.float64)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ w)))
        gradient = x.T @ (p - y) + 1e-3 * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-3 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def ood_thresholds(heldout_ood_scores: dict[str, np.ndarray], tpr: float = OOD_SERVING_TPR) -> dict[str, float]:
    """Per kind of item served, the OOD threshold that keeps ``tpr`` of its held-out items. One
    pooled threshold fails both ways: the tight kind (records) pulls it down until the loose one
    (prose) is refused far more often than 1 - ``tpr``, and a threshold loose enough for prose
    lets through records-shaped garbage that the record threshold refuses."""
    return {kind: float(np.quantile(scores, tpr)) for kind, scores in heldout_ood_scores.items()}


@dataclass(frozen=True)
class ValidationStream:
    """One kind's validation items in arrival order: their vectors, entities and provenance."""

    vectors: np.ndarray
    entities: list[str]
    data: str


def calibrate(streams: dict[str, ValidationStream],
              heldout_ood_scores: dict[str, np.ndarray]) -> dict[str, dict[str, object]]:
    """``thresholds`` and ``calibration`` manifest sections: per kind of item served, duplicate
    and match thresholds and Platt scaling from a simulated stream over its validation items, and
    the OOD threshold from its held-out in-distribution scores. The first kind is the bundle's
    primary one: its values are also the top-level fields (what a reader without
    ``by_modality`` uses)."""
    thresholds: dict[str, dict[str, float]] = {}
    fitted: dict[str, dict[str, object]] = {}
    ood = ood_thresholds(heldout_ood_scores)
    for kind, stream in streams.items():
        decisions = stream_decisions(stream.vectors, stream.entities)
        duplicate = threshold_for_precision(decisions.scores, decisions.nearest_is_same, DUPLICATE_PRECISION)
        match = band_threshold(decisions.scores, decisions.nearest_is_same, duplicate, MATCH_PRECISION)
        platt_a, platt_b = fit_platt(decisions.scores, decisions.nearest_is_same)
        thresholds[kind] = {"duplicate": duplicate, "match": match, "ood": ood[kind],
                            "platt_a": platt_a, "platt_b": platt_b}
        fitted[kind] = {"decisions": len(decisions.scores),
                        "true_duplicates": int(decisions.has_earlier_same.sum()), "data": stream.data}
    primary = next(iter(streams))
    top = thresholds[primary]
    return {
        "thresholds": {"duplicate": top["duplicate"], "match": top["match"], "ood": top["ood"],
                       "by_modality": thresholds},
        "calibration": {"platt_a": top["platt_a"], "platt_b": top["platt_b"],
                        "target_precision": DUPLICATE_PRECISION, "match_precision": MATCH_PRECISION,
                        "ood_tpr": OOD_SERVING_TPR, **fitted[primary], "by_modality": fitted},
    }


def precision_recall_f1(decisions: StreamDecisions, threshold: float) -> tuple[float, float, float]:
    """Scored like the demo: a duplicate call is right when the item it names is the same
    entity; recall is over items that have an earlier duplicate."""
    said = decisions.scores >= threshold
    correct = said & decisions.nearest_is_same
    tp = float(correct.sum())
    precision = tp / max(1.0, float(said.sum()))
    recall = tp / max(1.0, float(decisions.has_earlier_same.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both positives and negatives")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def all_pairs(vectors: np.ndarray, entities: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and same-entity label of every unordered pair."""
    codes = np.unique(np.asarray(entities), return_inverse=True)[1]
    upper = np.triu_indices(len(vectors), k=1)
    sims = (vectors @ vectors.T)[upper]
    return sims.astype(np.float32), codes[upper[0]] == codes[upper[1]]


def alignment_uniformity(vectors: np.ndarray, entities: list[str]) -> tuple[float, float]:
    """Wang & Isola 2020: E||f(x)-f(y)||^2 over positives, log E exp(-2||f(x)-f(y)||^2)."""
    sims, same = all_pairs(vectors, entities)
    squared = np.clip(2.0 - 2.0 * sims.astype(np.float64), 0.0, None)
    alignment = float(squared[same].mean()) if same.any() else float("nan")
    uniformity = float(np.log(np.exp(-2.0 * squared).mean()))
    return alignment, uniformity


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """AUROC (OOD as positive) and FPR at 95% and 99% TPR: the share of OOD inputs accepted when
    the threshold keeps 95% (99%, as served) of the in-distribution ones."""
    scores = np.concatenate([in_scores, out_scores])
    labels = np.concatenate([np.zeros(len(in_scores), bool), np.ones(len(out_scores), bool)])

    def accepted_at(tpr: float) -> float:
        return float((out_scores <= float(np.quantile(in_scores, tpr))).mean())

    return {"auroc": roc_auc(scores, labels), "fpr_at_95_tpr": accepted_at(OOD_TPR),
            "fpr_at_99_tpr": accepted_at(OOD_SERVING_TPR)}
