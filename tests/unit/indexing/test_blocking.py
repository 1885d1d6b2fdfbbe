"""Blocking keys (indexing/blocking.py): the lexical candidate source beside the cosine top-k."""

from __future__ import annotations

import json
from typing import Any

from twinstream.common.vectorstore import SIGNALS
from twinstream.indexing.blocking import (
    KEY_CANDIDATES,
    KEYS,
    MAX_KEY_ROWS,
    blocking_keys,
    postings_of,
    query_keys,
    selective_fields,
    shared_keys,
    with_keyed,
    with_keys,
)
from twinstream.indexing.calibration import COSINE, MIN_PATTERNS, CollectionState, text_signals
from twinstream.indexing.decide import Candidate
from twinstream.indexing.plan import GroupReads, lookup_keys, plan_group, triage
from twinstream.v1 import decisions_pb2, items_pb2

from .conftest import MakeItem
from .test_plan import MakeGroup, stored_row

PERSON = {"given_name": "Anna", "surname": "Meier", "suburb": "Bern", "postcode": "3011", "state": "be"}


def record(**changes: str) -> dict[str, object]:
    return {"fields": {**PERSON, **changes}}


def test_a_record_gets_one_key_per_pair_of_its_usable_field_values() -> None:
    keys = blocking_keys(record())
    assert len(keys) == 6  # 4 fields of 3+ characters ("be" is too short): 4 choose 2
    assert keys == blocking_keys(record(given_name=" ANNA", surname="meier."))  # normalised values


def test_a_copy_with_a_typo_shares_the_keys_of_the_pairs_without_that_field() -> None:
    original, copy = set(blocking_keys(record())), set(blocking_keys(record(surname="Meyer")))
    assert len(original & copy) == 3  # the pairs of given_name, suburb, postcode


def test_short_records_texts_and_images_get_no_keys() -> None:
    assert blocking_keys({"fields": {"name": "Allianz SE", "city": "Munich"}}) == []
    assert blocking_keys(record(suburb="", postcode="12")) == []  # two usable fields left
    assert blocking_keys(text_signals("a text of many words")) == []
    assert with_keys(text_signals("words")) == text_signals("words")


def test_keys_are_stored_inside_the_signals_beside_the_fields() -> None:
    signals = with_keys(record())
    assert signals is not None and signals[KEYS] == blocking_keys(record())
    assert signals["fields"] == record()["fields"]


def state_with(agreement: dict[str, float], pairs: int) -> CollectionState:
    """A records collection whose candidate pairs agreed on each field in the given share."""
    names = sorted(agreement)
    state = CollectionState(fields=[*names, COSINE])
    for n in range(pairs):  # pair n agrees on a field while n / pairs is below its share
        pattern = "".join("0" if n < agreement[name] * pairs else "3" for name in names) + "1"
        state.patterns[pattern] = state.patterns.get(pattern, 0) + 1
    return state


def test_a_field_agreeing_in_many_candidate_pairs_is_left_out_of_the_keys_read() -> None:
    share = {"given_name": 0.05, "postcode": 0.05, "state": 0.4, "suburb": 0.05, "surname": 0.05}
    assert selective_fields(state_with(share, MIN_PATTERNS)) == ["given_name", "postcode", "suburb", "surname"]
    assert selective_fields(state_with(share, MIN_PATTERNS - 1)) is None  # too few pairs yet: every field
    fewer = query_keys(record(state="nsw"), state_with(share, MIN_PATTERNS))
    assert len(fewer) == 6 and len(blocking_keys(record(state="nsw"))) == 10


def test_a_key_shared_by_too_many_earlier_items_selects_nothing() -> None:
    postings = {"rare": ["a", "b"], "common": [f"x{n}" for n in range(MAX_KEY_ROWS + 1)], "also": ["a"]}
    assert shared_keys(["rare", "common", "also"], postings) == {"a": 2, "b": 1}


def candidate(item_id: str, score: float) -> Candidate:
    return Candidate(item_id, score, item_id, 0)


def test_keyed_candidates_join_the_cosine_ones_most_shared_keys_first_and_once() -> None:
    cosine = [candidate("a", 0.9)]
    shared = {"a": 5, "b": 1, "c": 3, "d": 3, "e": 2}
    scores = {"b": 0.7, "c": 0.2, "d": 0.4, "e": 0.8}
    merged = with_keyed(cosine, shared, lambda i: candidate(i, scores[i]), limit=KEY_CANDIDATES)
    assert [c.item_id for c in merged] == ["a", "d", "c", "e"]
    assert [c.item_id for c in with_keyed(cosine, shared, lambda i: None)] == ["a"]


def test_postings_index_stored_rows_by_their_keys() -> None:
    postings = postings_of([("a", {KEYS: ["k1", "k2"]}), ("b", {KEYS: ["k2"]}), ("c", {}), ("d", None)])
    assert postings == {"k1": ["a"], "k2": ["a", "b"]}


def record_item(make_item: MakeItem, item_id: str, angle: float, fields: dict[str, Any],
                ingest_ms: int = 1000) -> items_pb2.EmbeddedItem:
    item = make_item(item_id, angle, ingest_ms=ingest_ms)
    item.accepted.item.modality = items_pb2.RECORD
    item.accepted.item.content = json.dumps(fields).encode()
    return item


def test_an_earlier_duplicate_outside_the_cosine_neighbours_is_found_through_shared_keys(
        make_item: MakeItem, make_group: MakeGroup) -> None:
    original = stored_row(make_item, "orig", angle=60)  # far in cosine: not among the hits
    original[SIGNALS] = with_keys(record())
    group = make_group([record_item(make_item, "copy", 0, PERSON | {"surname": "Meyer"})])
    triaged = triage(group, {})
    without = plan_group(group, triaged, GroupReads([[]], [], CollectionState()), neighbours=10)
    assert without.decided[0][1].kind == decisions_pb2.NOVEL
    reads = GroupReads([[]], [], CollectionState(), keyed=[original], keys=lookup_keys(triaged, CollectionState()))
    result = plan_group(group, triaged, reads, neighbours=10)
    (_, decision, _), = result.decided
    assert decision.kind == decisions_pb2.NEAR_DUPLICATE and decision.duplicate_of == "orig"
    stored = result.rows[0][SIGNALS]
    assert isinstance(stored, dict) and stored[KEYS] == blocking_keys(record(surname="Meyer"))  # for later items
