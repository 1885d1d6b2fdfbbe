"""Per-collection calibration (indexing/calibration.py): fitted on the collection's own stream."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest

from twinstream.indexing.calibration import (
    AGREE,
    DISAGREE,
    MISSING,
    SIMILAR,
    TEXT_SIGNALS,
    WARMUP_ITEMS,
    Calibration,
    CollectionState,
    FieldModel,
    Observation,
    compare_records,
    compare_texts,
    fdr_threshold,
    fit_fields,
    next_fit,
    text_signals,
    warm_up_model,
)
from twinstream.indexing.decide import Candidate, compare_fields, decide
from twinstream.v1 import decisions_pb2, items_pb2

from .test_decide import BUNDLE, embedded


def dedup_stream(items: int, duplicates: float, seed: int = 1) -> list[Observation]:
    """Best-neighbour and decoy scores of a collection: duplicates score near 0.95, the best
    non-duplicate of any item (and every decoy) between 0.55 and 0.8."""
    rng = random.Random(seed)
    out = []
    for _ in range(items):
        best = rng.uniform(0.9, 0.99) if rng.random() < duplicates else rng.uniform(0.55, 0.8)
        out.append(Observation(best, rng.uniform(0.55, 0.8)))
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


# -- records: the Fellegi-Sunter field model ------------------------------------------------------
FIELDS = ["date_of_birth", "given_name", "postcode", "surname"]


def person(rng: random.Random, n: int) -> dict[str, str]:
    return {"given_name": rng.choice(["anna", "bruno", "carla", "dieter", "emma"]), "surname": f"miller{n}son",
            "postcode": str(rng.randint(1000, 9999)),
            "date_of_birth": f"19{rng.randint(10, 99)}-0{rng.randint(1, 9)}-1{n % 10}"}


def fitted_field_model() -> FieldModel:
    """Fitted on candidate pairs of 300 people: each against 5 others, a third also against a typo'd copy."""
    rng = random.Random(4)
    people = [person(rng, n) for n in range(300)]
    counts: dict[str, int] = {}
    for n, p in enumerate(people):
        pairs = [people[(n + d) % 300] for d in range(1, 6)]
        if n % 3 == 0:
            pairs.append(dict(p, surname=p["surname"].replace("ll", "l"), postcode=""))
        for other in pairs:
            pattern = compare_records(p, other, FIELDS)
            counts[pattern] = counts.get(pattern, 0) + 1
    model = fit_fields(counts, FIELDS)
    assert model is not None
    return model


def test_fields_compare_as_agree_similar_missing_or_disagree() -> None:
    a = {"given_name": "Anna", "surname": "Miller", "postcode": "2600", "date_of_birth": "1980-01-02"}
    b = {"given_name": "anna", "surname": "Milller", "date_of_birth": "19800102"}
    assert compare_records(a, b, FIELDS) == AGREE + AGREE + MISSING + AGREE
    assert compare_records(a, {**b, "surname": "Zhou"}, FIELDS)[3] == DISAGREE
    assert compare_records(a, {**b, "given_name": "Annabel"}, FIELDS)[1] == SIMILAR


def test_digit_values_agree_only_when_equal_and_are_similar_only_when_two_digits_are_swapped() -> None:
    # by Jaro-Winkler a date ten days or two months off "agreed" (0.95-0.96): another product's
    # date was read as a copy's (products); a swap of two adjacent digits is the keying error
    a = {"given_name": "Anna", "surname": "Miller", "postcode": "2600", "date_of_birth": "1980-01-02"}
    level = {d: compare_records(a, {**a, "date_of_birth": d}, FIELDS)[0] for d in
             ("19800102", "1980-01-12", "1980-03-12", "1980-10-02", "02.01.1980")}
    assert level == {"19800102": AGREE, "1980-01-12": DISAGREE, "1980-03-12": DISAGREE,
                     "1980-10-02": SIMILAR, "02.01.1980": DISAGREE}
    assert compare_records(a, {**a, "postcode": "2060"}, FIELDS)[2] == SIMILAR
    assert compare_records(a, {**a, "postcode": "26000"}, FIELDS)[2] == DISAGREE
    assert compare_records(a, {**a, "surname": "Millre"}, FIELDS)[3] == AGREE  # words: Jaro-Winkler


def test_the_field_model_learns_without_labels_that_agreeing_records_are_duplicates() -> None:
    model = fitted_field_model()
    assert model.probability(AGREE * 4) > 0.99
    assert model.probability(AGREE + AGREE + MISSING + SIMILAR) > 0.5  # the typo'd copy
    assert model.probability(DISAGREE + AGREE + DISAGREE + DISAGREE) < 0.01  # same first name only


def test_the_field_model_overrules_a_close_cosine() -> None:
    model = fitted_field_model()
    fitted = replace(fed(dedup_stream(1000, 0.3)).calibration, fields=model)
    a = {"given_name": "anna", "surname": "miller", "postcode": "2600", "date_of_birth": "1980-01-02"}
    other = {"given_name": "anna", "surname": "zhou", "postcode": "4000", "date_of_birth": "1955-07-30"}
    item = embedded()
    item.accepted.item.modality = items_pb2.RECORD
    item.accepted.item.content = json.dumps(a).encode()
    near = [Candidate("x", 0.97, "x", 10, signals={"fields": other}),
            Candidate("y", 0.90, "y", 11, signals={"fields": dict(a, postcode="")})]
    candidates = compare_fields({"fields": a}, near, FIELDS, model)
    decision = decide(item, candidates, BUNDLE, 3, 5, fitted)
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "y"
    assert decision.calibration.record_fields and decision.duplicate_probability > 0.5
    assert decision.neighbours[0].comparison == DISAGREE + AGREE + DISAGREE + DISAGREE


def test_a_young_collection_without_duplicates_calls_no_shared_first_name_a_duplicate() -> None:
    # FEBRL3's first fit (50 items): its candidate pairs held no duplicates, some shared a common
    # first name, and EM made "agree on the first name only" P(duplicate) 1.0 (16 false calls)
    fields = ["address", "given_name", "surname", "cosine"]
    model = fit_fields({"3332": 300, "3333": 100, "3032": 12, "3232": 20, "2332": 15}, fields)
    assert model is not None
    assert model.probability("3032") < 0.5
    assert model.probability("0000") > 0.99  # a pair agreeing on everything still is one


def test_a_missing_record_field_counts_as_a_disagreement() -> None:
    # copies often drop fields (DupeHell): with "missing" a level of its own, EM learnt that a
    # sparse record is a copy, and called one whose only field disagrees a duplicate
    fields = ["address", "name", "phone", "cosine"]
    model = fit_fields({"0000": 10, "0220": 70, "3333": 400, "3323": 10, "0332": 8, "0221": 20}, fields)
    assert model is not None
    assert model.probability("3221") < 0.5  # the address disagrees, nothing else to go on
    assert model.probability("0220") > 0.99  # a copy that dropped two fields still is one
    assert model.probability("0020") == model.probability("0030")
    assert model.probability("0002") != model.probability("0003")  # the cosine's level 2 is a level


# -- text: cosine, shingle Jaccard and containment -------------------------------------------------
PARAGRAPH = ("Return a new array of given shape and type, filled with zeros. The array is laid out in "
             "row-major order unless another order is asked for, and its values are not copied.")


def test_a_texts_copy_agrees_on_shingles_and_another_text_does_not() -> None:
    original = text_signals(PARAGRAPH)
    copy = text_signals(PARAGRAPH.replace("zeros", "zeroes").upper()[:120])  # a typo, shouting, cut short
    other = text_signals("Compute the discrete Fourier transform of a sequence along one axis, in place.")
    assert original == text_signals(PARAGRAPH)  # deterministic: signatures compare across restarts
    assert compare_texts(original, copy, 0.93)[2] == AGREE  # the copy is contained in the original
    assert compare_texts(original, other, 0.55)[1:] == DISAGREE + DISAGREE
    assert compare_texts(original, {}, 0.85) == SIMILAR + MISSING + MISSING  # stored before signals
    # a text of one shingle (5 characters or fewer) says nothing by its shingles: the cosine decides
    assert compare_texts(text_signals("A"), text_signals("C"), 0.87) == SIMILAR + MISSING + MISSING


def test_a_text_collection_decides_by_shingles_during_warm_up() -> None:
    # before its first fit a text collection's pairs were decided by the bundle's cosine threshold
    # alone: on the readmes set that called boilerplate licences copies and missed typo'd copies
    copy = Candidate("copy", 0.66, "copy", 1, signals=text_signals(PARAGRAPH.replace("zeros", "zeroes")))
    other = Candidate("other", 0.77, "other", 2, signals=text_signals(
        "Build an array of ones: the values come in the layout you choose, and nothing is shared."))
    scored = compare_fields(text_signals(PARAGRAPH), [copy, other], TEXT_SIGNALS, None)
    assert [c.item_id for c in scored if c.probability >= 0.5] == ["copy"]
    item = embedded()
    item.accepted.item.modality = items_pb2.TEXT
    decision = decide(item, scored, BUNDLE, 3, 5, Calibration())
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "copy"


def test_a_records_collection_decides_by_its_fields_during_warm_up() -> None:
    # books: before the first fit the bundle's cosine (0.875 >= 0.857) called another book of
    # the same title, and nothing else in common, a duplicate
    book = {"title": "ll bean ultrawarm coat", "isbn": "978-69-500-73607-7", "edition": "514",
            "language": "french", "pages": "125-151"}
    same_title = {"title": "ll bean ultrawarm coat", "isbn": "978-63-133-71601-8", "edition": "31280",
                  "language": "lithuanian", "pages": "332-340"}
    copy = dict(book, language="", title="ll bean ultrawarm cota")
    fields = [*sorted(book), "cosine"]
    near = [Candidate("same-title", 0.875, "same-title", 1, signals={"fields": same_title}),
            Candidate("copy", 0.8, "copy", 2, signals={"fields": copy})]
    scored = compare_fields({"fields": book}, near, fields, None)
    assert [c.item_id for c in scored if c.probability >= 0.5] == ["copy"]
    assert warm_up_model(["name", "cosine"]) is None  # one free-text field: the cosine decides


def test_an_intermediate_level_the_non_duplicates_never_showed_does_not_decide_alone() -> None:
    # the readmes set's pair patterns at its fit at 200 items: two texts sharing a sentence or
    # two (Jaccard 0.2-0.4, containment 0.5-0.8, cosine below 0.7) were called copies at 0.92,
    # as 0.3 pairs of pseudo-count among ~1900 non-duplicate pairs left that level odds of ~700
    counts = {"333": 1825, "000": 46, "100": 22, "233": 15, "200": 9, "332": 7, "311": 4, "010": 4, "322": 4,
              "310": 2, "300": 1, "111": 1, "321": 1, "132": 1, "001": 1, "211": 1, "133": 1}
    model = fit_fields(counts, TEXT_SIGNALS)
    assert model is not None
    assert model.probability("321") < 0.5
    assert model.probability("100") > 0.99 and model.probability("000") > 0.99
