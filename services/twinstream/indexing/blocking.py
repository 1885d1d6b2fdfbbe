"""A lexical candidate source beside the cosine top-k, for records (as ECM's blocking is).

The cosine top-k misses a record's earlier duplicate when typos in several fields move its
vector away (FEBRL3: 22 of 734 duplicates outside the top 10). A duplicate still shares most of
its fields exactly, so each record carries blocking keys: one short hash per pair of its
(normalised) field values. The indexer reads the stored rows of its scope sharing a key with a
new item (one Milvus query per batch) and adds the few that share the most keys to the item's
cosine neighbours before the field comparison decides. Pairs, not single values, keep a key
selective; a field that agrees in many candidate pairs (a state, a source system) is left out
of the keys read (``selective_fields``, learnt online from the collection's own comparison
patterns, no labels), and a key more than ``MAX_KEY_ROWS`` earlier rows share is ignored.
The bench replay (``bench.methods.replay``) calls the same functions over an in-memory index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations

from twinstream.indexing.calibration import AGREE, COSINE, MIN_PATTERNS, CollectionState, normalise
from twinstream.indexing.decide import Candidate

KEYS = "keys"  # where an item's blocking keys live in its signals (no schema change)
MIN_KEY_FIELDS = 3  # records with fewer non-empty fields get no keys (a name alone: the cosine decides)
MIN_VALUE_CHARS = 3  # shorter normalised values are no part of a key (initials, empty values)
KEY_FIELDS = 16  # keys use at most this many fields (sorted by name): at most 120 keys a record
KEY_HEX = 10  # 40 bits a key: a chance collision per scope is rare and only adds a candidate
COMMON_AGREEMENT = 0.15  # a field agreeing in more candidate pairs than this share is not selective
READ_FIELDS = 6  # keys are read over at most this many of the most selective fields
MAX_KEY_ROWS = 20  # a key shared by more earlier rows than this is common: it selects nothing
KEY_CANDIDATES = 3  # keyed candidates added per item, beyond its cosine neighbours
KEYS_PER_QUERY = 2048  # keys in one Milvus filter (a batch of 64 records reads ~1000)


def field_values(signals: Mapping[str, object] | None) -> dict[str, str]:
    """A record's key-worthy fields: normalised values of at least ``MIN_VALUE_CHARS``."""
    record = signals.get("fields") if signals else None
    if not isinstance(record, dict):
        return {}
    names = sorted(str(k) for k in record)[:KEY_FIELDS]
    values = {name: normalise(record[name]) for name in names if record[name] is not None}
    return {name: value for name, value in values.items() if len(value) >= MIN_VALUE_CHARS}


def blocking_keys(signals: Mapping[str, object] | None, fields: Iterable[str] | None = None) -> list[str]:
    """The record's keys, one per pair of its field values (only pairs within ``fields``, when
    given); none for a record of fewer than ``MIN_KEY_FIELDS`` usable fields, a text or an image."""
    values = field_values(signals)
    if len(values) < MIN_KEY_FIELDS:
        return []
    allowed = set(values) if fields is None else set(fields) & set(values)
    names = sorted(allowed)
    return sorted({_hash(f"{a}={values[a]}\x1f{b}={values[b]}") for a, b in combinations(names, 2)})


def with_keys(signals: dict[str, object] | None) -> dict[str, object] | None:
    """The signals with the record's keys added under ``KEYS`` (stored with the row)."""
    if signals is None:
        return None
    keys = blocking_keys(signals)
    return {**signals, KEYS: keys} if keys else signals


def selective_fields(state: CollectionState) -> list[str] | None:
    """The record fields whose keys are read: those that agree in at most ``COMMON_AGREEMENT``
    of the collection's candidate pairs so far; ``None`` (every field) until ``MIN_PATTERNS``
    pairs were seen. Cosine neighbours share common values (a state) far more often than
    duplicates are among them, so the share tells a low-cardinality field without labels."""
    names = [name for name in state.fields if name != COSINE]
    if not names or len(state.fields) < 2 or state.fields[-1] != COSINE:
        return None
    width = len(state.fields)
    counted = [(p, n) for p, n in state.patterns.items() if len(p) == width]
    total = sum(n for _, n in counted)
    if total < MIN_PATTERNS:
        return None
    agree = {name: sum(n for p, n in counted if p[k] == AGREE) / total for k, name in enumerate(names)}
    chosen = sorted((share, name) for name, share in agree.items() if share <= COMMON_AGREEMENT)
    return sorted(name for _, name in chosen[:READ_FIELDS])


def query_keys(signals: Mapping[str, object] | None, state: CollectionState) -> list[str]:
    """The keys a new item is looked up by (its pairs of selective fields)."""
    return blocking_keys(signals, selective_fields(state))


def shared_keys(keys: Sequence[str], postings: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Earlier items sharing a key with the item (``postings``: key -> earlier item ids), with
    how many keys each shares; keys more than ``MAX_KEY_ROWS`` items share are left out."""
    counts: dict[str, int] = {}
    for key in keys:
        ids = postings.get(key, ())
        if len(ids) > MAX_KEY_ROWS:
            continue
        for item_id in ids:
            counts[item_id] = counts.get(item_id, 0) + 1
    return counts


def with_keyed(candidates: Sequence[Candidate], shared: Mapping[str, int],
               make: Callable[[str], Candidate | None], limit: int = KEY_CANDIDATES) -> list[Candidate]:
    """The cosine candidates plus up to ``limit`` earlier items sharing keys with the item (most
    shared keys first, then cosine), made by ``make`` (``None``: not a candidate); an item
    already among the candidates is not added twice."""
    known = {c.item_id for c in candidates}
    keyed = [c for item_id in shared if item_id not in known and (c := make(item_id)) is not None]
    keyed.sort(key=lambda c: (-shared[c.item_id], -c.score, c.ingest_time_ms, c.item_id))
    return [*candidates, *keyed[:limit]]


def postings_of(rows: Iterable[tuple[str, object]]) -> dict[str, list[str]]:
    """key -> item ids, from ``(item_id, signals)`` of stored rows."""
    postings: dict[str, list[str]] = {}
    for item_id, signals in rows:
        keys = signals.get(KEYS) if isinstance(signals, dict) else None
        for key in keys if isinstance(keys, list) else ():
            postings.setdefault(str(key), []).append(item_id)
    return postings


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()[:KEY_HEX]
