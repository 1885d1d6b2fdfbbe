"""Per-collection calibration: what decides a tenant/collection, fitted on its own stream, no labels.

A bundle's thresholds are fitted to its training data; on a user's own data they do not hold.
So every tenant/collection keeps, online, what its own items look like to the encoder:

* **OOD reference**: the best-neighbour similarity of its in-distribution items. An item whose
  best neighbour is less similar than nearly all of them (below ``ood_floor``) is unlike this
  collection and is refused. During warm-up (the first ``WARMUP_ITEMS``) nothing is refused as
  OOD: the collection's first items *are* its reference, whatever the bundle's detector says.
* **Profile reference** (text and images): the content profiles of its last ``PROFILE_WINDOW``
  accepted items (``indexing.profile``); an item whose profile is farther from them than the
  fitted limit is refused too, as the cosine alone lets foreign items through (code into prose,
  text pages into images: docs/calibration.md).
* **Duplicate threshold**, by target-decoy false-discovery control: each item's best neighbour is
  a *target* (a duplicate or the best non-duplicate), its runner-up from another cluster a
  *decoy* (almost never a duplicate). Above a threshold ``t`` the estimated share of false calls
  is ``#decoys >= t / #targets >= t``; the duplicate threshold is the lowest ``t`` where that
  stays within ``1 - TARGET_PRECISION``, the match threshold the lowest within ``MATCH_FDR``.

* **Pair model** (Fellegi-Sunter): each candidate pair is compared signal by signal into a
  pattern of levels: records field by field (Jaro-Winkler over normalised values: agree /
  similar / missing / disagree), text by cosine, character-shingle Jaccard and containment
  (from MinHash signatures), images by cosine and pHash / dHash Hamming distance.
  An EM fit of the two-class conditional-independence model over the
  collection's own pair patterns gives P(duplicate | pattern); once fitted it decides instead of
  the cosine threshold (the cosine still finds the candidates). Patterns are kept as counts, so
  the state stays small however long the stream.

Refitted when the observed item count doubles (then every ``REFIT_EVERY``), over the last
``WINDOW`` observations; every fit is a new ``version`` that each decision names, so a decision
can always be traced to the calibration that made it. Pure: no IO (see ``CalibrationStore``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import jellyfish
import numpy as np
from PIL import Image

from twinstream.indexing import perceptual
from twinstream.indexing.profile import (
    IMAGE_LIMIT_RATIO,
    ProfileReference,
    fit_reference,
    image_profile,
    text_profile,
)

WARMUP_ITEMS = 50
WINDOW = 2048  # observations kept (a persisted state stays under Milvus's 64 KiB string)
PROFILE_WINDOW = 128  # accepted items' content profiles kept, twice (window and reference): 2 x ~7 KiB of JSON
REFIT_EVERY = 1024
TARGET_PRECISION = 0.95
MATCH_FDR = 0.5
OOD_QUANTILE = 0.01  # reference items below the floor: in-distribution items refused, at most
OOD_MARGIN = 0.25  # the floor sits this share of the (median - quantile) spread below the quantile
MIN_TARGETS = 3  # a threshold needs at least this many targets above it
MAX_FIELDS = 16
AGREE, SIMILAR, MISSING, DISAGREE = "0", "1", "2", "3"  # a field comparison's level
LEVELS = 4
EM_ITERATIONS = 200
MIN_PATTERNS = 200  # candidate pairs seen before a field model is fitted
# EM's pseudo-count per level of each class: PSEUDO_PAIRS pairs plus PSEUDO_SHARE of the class's
# weight, so a level no pair of a class showed yet stays possible in proportion to the class.
# Without the first, one young fit gave agreement on nothing P(duplicate) 1.0 (FEBRL3); without
# the second, the thousands of non-duplicate pairs left an intermediate level (texts sharing a
# few sentences) odds of ~700 for a duplicate (readmes): docs/calibration.md.
PSEUDO_PAIRS = 0.3
PSEUDO_SHARE = 0.003
COSINE = "cosine"  # records are compared on their fields and the learned cosine
TEXT_SIGNALS = (COSINE, "jaccard", "containment")  # what texts are compared on
COSINE_LEVELS = (0.9, 0.8, 0.7)  # level 0 at or above the first cut, 3 below the last
JACCARD_LEVELS = (0.6, 0.4, 0.2)
CONTAINMENT_LEVELS = (0.8, 0.5, 0.25)
IMAGE_SIGNALS = (COSINE, "phash", "dhash")  # what images are compared on
HAMMING_LEVELS = (6, 12, 20)  # bits of 64 that differ: level 0 at or below the first cut, 3 above the last
PRIOR_PHASH_BITS = 4  # before the pair model is fitted, an image this close in pHash is a copy
PRIOR_DUPLICATE = 0.95  # ... with this P(duplicate) (the precision target)
SHINGLE = 5
PERMUTATIONS = 128
_PRIME = (1 << 31) - 1
_RNG = np.random.default_rng(20261129)  # fixed: signatures must compare across restarts
_A = _RNG.integers(1, _PRIME, PERMUTATIONS, dtype=np.uint64)
_B = _RNG.integers(0, _PRIME, PERMUTATIONS, dtype=np.uint64)


@dataclass(frozen=True)
class FieldModel:
    """Fellegi-Sunter: per field, P(level | duplicate) and P(level | not), and the prior."""

    fields: tuple[str, ...]
    m: tuple[tuple[float, ...], ...]
    u: tuple[tuple[float, ...], ...]
    prior: float

    def probability(self, pattern: str) -> float:
        """P(duplicate | the pair's comparison pattern); a missing record field counts as a
        disagreement (``model_levels``)."""
        levels = model_levels(pattern, self.fields)
        log_m = math.log(self.prior) + sum(math.log(self.m[k][c]) for k, c in enumerate(levels))
        log_u = math.log(1 - self.prior) + sum(math.log(self.u[k][c]) for k, c in enumerate(levels))
        return 1.0 / (1.0 + math.exp(min(700.0, log_u - log_m)))


# What decides a text collection's pairs before its own model is fitted (warm-up): a prior,
# not fitted to any data set, that a copy shares most shingles and another text few; it
# replaced the bundle's cosine threshold there (readmes F1 0.961 -> 0.983, docs/calibration.md).
TEXT_PRIOR = FieldModel(TEXT_SIGNALS,
                        m=((0.5, 0.3, 0.15, 0.05), (0.6, 0.25, 0.1, 0.05), (0.7, 0.2, 0.07, 0.03)),
                        u=((0.02, 0.08, 0.2, 0.7), (0.005, 0.015, 0.08, 0.9), (0.01, 0.03, 0.1, 0.86)),
                        prior=0.3)


# A records collection's warm-up prior: each field agrees in most copies and in few other pairs
# (its "missing" level is read as a disagreement, see ``model_levels``), the cosine as in
# ``TEXT_PRIOR``. Only for records of at least ``RECORD_PRIOR_MIN_FIELDS`` fields: one or two
# free-text fields (companies: one "name" of name and address) are text-like, their variants
# disagree field-wise, so the bundle's cosine threshold decides their warm-up (books F1 0.997 ->
# 1.000, products 0.981 -> 0.984; on companies a prior for every record cost 0.943 -> 0.909).
RECORD_PRIOR_FIELD_M = (0.85, 0.1, 1e-6, 0.05)
RECORD_PRIOR_FIELD_U = (0.05, 0.05, 1e-6, 0.9)
RECORD_PRIOR_MIN_FIELDS = 3


def warm_up_model(fields: Sequence[str]) -> FieldModel | None:
    """What decides a collection's pairs before its own pair model is fitted: ``TEXT_PRIOR``
    for text, the records prior for records of enough fields, else nothing (the cosine)."""
    if tuple(fields) == TEXT_SIGNALS:
        return TEXT_PRIOR
    names = len(fields) - 1
    if not any(record_columns(fields)) or names < RECORD_PRIOR_MIN_FIELDS:
        return None
    return FieldModel(tuple(fields), (*(RECORD_PRIOR_FIELD_M,) * names, TEXT_PRIOR.m[0]),
                      (*(RECORD_PRIOR_FIELD_U,) * names, TEXT_PRIOR.u[0]), 0.1)


@dataclass(frozen=True)
class Calibration:
    """What decides one tenant/collection at a time; version 0 is the bundle's prior."""

    version: int = 0
    duplicate: float = math.inf
    match: float = math.inf
    ood_floor: float = -math.inf  # -inf: nothing refused (warm-up)
    fitted_on: int = 0
    fields: FieldModel | None = None
    profile: ProfileReference | None = None  # None: no profile rule (records, too few profiles)

    @property
    def warm(self) -> bool:
        return self.version > 0


@dataclass(frozen=True)
class Observation:
    """What one decided, in-distribution item tells the calibration: its best neighbour's
    similarity and its best from another cluster (the decoy); NaN where there was none."""

    best: float
    decoy: float
    patterns: tuple[str, ...] = ()  # field comparisons of a record with its candidates
    profile: tuple[float, ...] = ()  # the item's content profile (text, images; ``indexing.profile``)


@dataclass
class CollectionState:
    """The online state of one tenant/collection, persisted by the indexer between batches."""

    items: int = 0
    best: list[float] = field(default_factory=list)
    decoy: list[float] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    fields: list[str] = field(default_factory=list)  # compared fields, from the first record
    patterns: dict[str, int] = field(default_factory=dict)  # comparison pattern -> pairs seen
    profiles: list[list[float]] = field(default_factory=list)  # accepted items' profiles, the last PROFILE_WINDOW

    def field_names(self, signals: Mapping[str, object]) -> list[str]:
        """What this collection's pairs are compared on, set by its first item: a record's
        fields (up to ``MAX_FIELDS``) or, for text, ``TEXT_SIGNALS``."""
        if not self.fields:
            record = signals.get("fields")
            self.fields = ([*sorted(str(k) for k in record)[:MAX_FIELDS], COSINE] if isinstance(record, dict)
                           else list(IMAGE_SIGNALS) if is_image_signals(signals) else list(TEXT_SIGNALS))
        return self.fields

    def observe(self, observation: Observation) -> bool:
        """Add one item; refit when due. Returns whether the calibration changed."""
        self.items += 1
        # rounded as stored, so a state read back after a restart fits exactly as one kept in memory
        self.best = [*self.best[-(WINDOW - 1):], round(observation.best, 4)]
        self.decoy = [*self.decoy[-(WINDOW - 1):], round(observation.decoy, 4)]
        for pattern in observation.patterns:
            self.patterns[pattern] = self.patterns.get(pattern, 0) + 1
        if observation.profile:
            self.profiles = [*self.profiles[-(PROFILE_WINDOW - 1):], list(observation.profile)]
        if self.items < next_fit(self.calibration):
            return False
        self.calibration = fit(self.best, self.decoy, self.items, self.calibration)
        if sum(self.patterns.values()) >= MIN_PATTERNS:
            self.calibration = replace(self.calibration, fields=fit_fields(self.patterns, self.fields))
        images = self.fields == list(IMAGE_SIGNALS)
        self.calibration = replace(self.calibration, profile=fit_reference(
            self.profiles, IMAGE_LIMIT_RATIO if images else math.inf))
        return True

    def to_json(self) -> str:
        # NaN and inf are not JSON: store them as null and as strings
        def clean(value: float) -> float | str | None:
            return None if math.isnan(value) else (str(value) if math.isinf(value) else value)

        calibration = {k: clean(v) for k, v in asdict(self.calibration).items() if k not in ("fields", "profile")}
        model, reference = self.calibration.fields, self.calibration.profile
        return json.dumps({"items": self.items, "best": [clean(v) for v in self.best],
                           "decoy": [clean(v) for v in self.decoy], "calibration": calibration,
                           "field_model": asdict(model) if model else None,
                           "fields": self.fields, "patterns": self.patterns,
                           "profile_reference": reference.to_json() if reference else None,
                           "profiles": self.profiles},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CollectionState:
        def num(value: float | str | None) -> float:
            return math.nan if value is None else float(value)

        raw = json.loads(text)
        c, f, r = raw["calibration"], raw.get("field_model"), raw.get("profile_reference")
        model = FieldModel(tuple(f["fields"]), tuple(tuple(r) for r in f["m"]), tuple(tuple(r) for r in f["u"]),
                           float(f["prior"])) if f else None
        return cls(int(raw["items"]), [num(v) for v in raw["best"]], [num(v) for v in raw["decoy"]],
                   Calibration(int(c["version"]), num(c["duplicate"]), num(c["match"]), num(c["ood_floor"]),
                               int(c["fitted_on"]), model, ProfileReference.from_json(r) if r else None),
                   [str(x) for x in raw.get("fields", [])],
                   {str(k): int(v) for k, v in raw.get("patterns", {}).items()},
                   [[float(v) for v in p] for p in raw.get("profiles", [])])


def next_fit(calibration: Calibration) -> int:
    """The item count at which the next fit is due: warm-up, then doubling, then every REFIT_EVERY."""
    if not calibration.warm:
        return WARMUP_ITEMS
    return calibration.fitted_on + min(calibration.fitted_on, REFIT_EVERY)


def fdr_threshold(targets: np.ndarray, decoys: np.ndarray, fdr: float) -> float:
    """The lowest threshold at which ``#decoys >= t / #targets >= t <= fdr`` with at least
    ``MIN_TARGETS`` targets above it (inf when there is none)."""
    ranked = np.sort(targets)[::-1]
    sorted_decoys = np.sort(decoys)
    if len(ranked) < MIN_TARGETS:
        return math.inf
    above = len(sorted_decoys) - np.searchsorted(sorted_decoys, ranked, side="left")
    ratio = above / np.arange(1, len(ranked) + 1)
    ok = np.nonzero(ratio <= fdr)[0]
    ok = ok[ok >= MIN_TARGETS - 1]
    if not len(ok):
        return math.inf
    # the lowest threshold below which the estimate never comes back within target
    return float(ranked[int(ok.max())])


def ood_floor(best: np.ndarray) -> float:
    """Best-neighbour similarities below this are unlike the collection's own items."""
    low, mid = np.quantile(best, [OOD_QUANTILE, 0.5])
    return float(low - OOD_MARGIN * (mid - low))


def fit(best: Sequence[float], decoy: Sequence[float], items: int, previous: Calibration) -> Calibration:
    """A new calibration from the collection's recent observations."""
    targets = np.asarray([b for b in best if not math.isnan(b)], dtype=np.float64)
    decoys = np.asarray([d for d in decoy if not math.isnan(d)], dtype=np.float64)
    if not len(targets):
        return replace(previous, version=previous.version + 1, fitted_on=items)
    duplicate = fdr_threshold(targets, decoys, 1.0 - TARGET_PRECISION)
    match = min(duplicate, fdr_threshold(targets, decoys, MATCH_FDR))
    return Calibration(previous.version + 1, duplicate, match, ood_floor(targets), items, previous.fields,
                       previous.profile)


_NOT_DIGIT, _SPACE, _NOT_WORD = re.compile(r"\D"), re.compile(r"\s"), re.compile(r"[^\w ]")
CACHED_VALUE_CHARS = 256  # longer values are normalised each time (the cache stays small)


def normalise(value: object) -> str:
    """Mostly-digit values (phones, dates, ids) as their digits; else lower-case words."""
    text = str(value)
    return _cached_normalise(text) if len(text) <= CACHED_VALUE_CHARS else _normalise(text)


def _normalise(text: str) -> str:
    text = text.strip().lower()
    digits = _NOT_DIGIT.sub("", text)
    if digits and len(digits) >= 0.6 * len(_SPACE.sub("", text)):
        return digits
    return " ".join(_NOT_WORD.sub(" ", text).split())


# An item's fields are compared with each of its candidates, and a stored item's with every later
# item it neighbours: the regexes were a quarter of the indexer's own CPU (py-spy), so cache them.
_cached_normalise = lru_cache(maxsize=1 << 15)(_normalise)


def _level(value: float, cuts: Sequence[float]) -> str:
    return str(next((n for n, cut in enumerate(cuts) if value >= cut), len(cuts)))


def shingles(text: str) -> set[str]:
    """Character ``SHINGLE``-grams of the lower-cased, whitespace-collapsed text."""
    norm = " ".join(text.lower().split())
    return {norm[i:i + SHINGLE] for i in range(max(1, len(norm) - SHINGLE + 1))}


def text_signals(text: str) -> dict[str, object]:
    """A MinHash signature of the text's shingles and their count (for Jaccard and containment),
    and its content profile (``indexing.profile``, for the OOD rule)."""
    grams = shingles(text)
    hashed = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") % _PRIME
                       for g in grams], dtype=np.uint64)
    signature = ((hashed[:, None] * _A[None, :] + _B[None, :]) % _PRIME).min(axis=0)
    return {"minhash": [int(v) for v in signature], "shingles": len(grams), "profile": text_profile(text)}


def compare_texts(a: Mapping[str, object], b: Mapping[str, object], cosine: float) -> str:
    """The pair's levels of cosine, estimated shingle Jaccard and containment (both missing for a
    text of a single shingle, ``SHINGLE`` characters or fewer: equal or not, it says nothing)."""
    sig_a, sig_b = a.get("minhash"), b.get("minhash")
    size_a, size_b = a.get("shingles"), b.get("shingles")
    if not isinstance(sig_a, list) or not isinstance(sig_b, list) or len(sig_a) != len(sig_b) \
            or not isinstance(size_a, int) or not isinstance(size_b, int) or min(size_a, size_b) < 2:
        return _level(cosine, COSINE_LEVELS) + MISSING + MISSING
    jaccard = float(np.mean(np.asarray(sig_a) == np.asarray(sig_b)))
    shared = jaccard * (size_a + size_b) / (1 + jaccard)
    containment = shared / min(size_a, size_b)
    return _level(cosine, COSINE_LEVELS) + _level(jaccard, JACCARD_LEVELS) + _level(containment, CONTAINMENT_LEVELS)


def image_signals(image: Image.Image) -> dict[str, object]:
    """An image's perceptual hashes (pHash and dHash, 64 bits each, as hex) and its content
    profile (``indexing.profile``, for the OOD rule)."""
    return {"phash": perceptual.phash(image), "dhash": perceptual.dhash(image), "profile": image_profile(image)}


def is_image_signals(signals: Mapping[str, object]) -> bool:
    return isinstance(signals.get("phash"), str) and isinstance(signals.get("dhash"), str)


def _hamming(a: object, b: object) -> int | None:
    """Bits that differ between two stored hashes (``None`` unless both are hashes of one size)."""
    if not isinstance(a, str) or not isinstance(b, str) or len(a) != len(b):
        return None
    return perceptual.hamming(a, b)


def _hamming_level(a: object, b: object) -> str:
    distance = _hamming(a, b)
    if distance is None:
        return MISSING
    return str(next((n for n, cut in enumerate(HAMMING_LEVELS) if distance <= cut), len(HAMMING_LEVELS)))


def compare_images(a: Mapping[str, object], b: Mapping[str, object], cosine: float) -> str:
    """The pair's levels of cosine and of pHash and dHash Hamming distance (``HAMMING_LEVELS``)."""
    return (_level(cosine, COSINE_LEVELS) + _hamming_level(a.get("phash"), b.get("phash"))
            + _hamming_level(a.get("dhash"), b.get("dhash")))


def image_prior(a: Mapping[str, object], b: Mapping[str, object]) -> float:
    """P(duplicate) of an image pair before its collection's pair model is fitted (NaN: the
    cosine threshold decides): ``PRIOR_DUPLICATE`` when their pHashes differ in at most
    ``PRIOR_PHASH_BITS`` bits. Like the bundle's thresholds, only a prior for the warm-up."""
    distance = _hamming(a.get("phash"), b.get("phash"))
    return PRIOR_DUPLICATE if distance is not None and distance <= PRIOR_PHASH_BITS else math.nan


def compare(a: Mapping[str, object], b: Mapping[str, object], cosine: float, fields: Sequence[str]) -> str:
    """The pair's comparison pattern: records field by field, text by its ``TEXT_SIGNALS``;
    "" when the item is not of the kind the collection compares (a text in a records collection)."""
    if tuple(fields) == TEXT_SIGNALS:
        return compare_texts(a, b, cosine) if "minhash" in a else ""
    if tuple(fields) == IMAGE_SIGNALS:
        return compare_images(a, b, cosine) if is_image_signals(a) else ""
    record_a, record_b = a.get("fields"), b.get("fields")
    if not isinstance(record_a, dict):
        return ""
    names = [name for name in fields if name != COSINE]
    cosine_level = _level(cosine, COSINE_LEVELS) if COSINE in fields else ""
    if not isinstance(record_b, dict):
        return MISSING * len(names) + cosine_level
    return compare_records(record_a, record_b, names) + cosine_level


def compare_records(a: Mapping[str, object], b: Mapping[str, object], fields: Sequence[str]) -> str:
    """The pair's comparison pattern: one level per field (Jaro-Winkler of normalised values)."""
    levels = []
    for name in fields:
        x, y = a.get(name), b.get(name)
        if x is None or y is None or str(x).strip() == "" or str(y).strip() == "":
            levels.append(MISSING)
            continue
        levels.append(field_level(normalise(x), normalise(y)))
    return "".join(levels)


def field_level(x: str, y: str) -> str:
    """Two normalised field values' level. Words by Jaro-Winkler (agree >= 0.95, similar >= 0.8).
    Digit values (dates, phones, ids) agree only when equal, are similar when two adjacent digits
    are swapped (the keying error) and otherwise disagree: one digit off is another date or id as
    often as a typo. By Jaro-Winkler nearly any two dates were similar and two ten days apart
    agreed, so EM read another product's date as a copy's (products, docs/calibration.md)."""
    if x.isdigit() and y.isdigit():
        return AGREE if x == y else SIMILAR if transposed(x, y) else DISAGREE
    similarity = jellyfish.jaro_winkler_similarity(x, y)
    return AGREE if similarity >= 0.95 else SIMILAR if similarity >= 0.8 else DISAGREE


def transposed(x: str, y: str) -> bool:
    """Whether ``y`` is ``x`` with two adjacent characters swapped."""
    differ = [i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b]
    return (len(x) == len(y) and len(differ) == 2 and differ[1] == differ[0] + 1
            and x[differ[0]] == y[differ[1]] and x[differ[1]] == y[differ[0]])


def record_columns(fields: Sequence[str]) -> list[bool]:
    """Which columns of a pattern are record fields: every column of a records collection's
    pattern but its last, the cosine (other signals' level 2 is a level, not "missing")."""
    is_records = len(fields) > 1 and fields[-1] == COSINE and tuple(fields) != TEXT_SIGNALS
    return [is_records and k < len(fields) - 1 for k in range(len(fields))]


def model_levels(pattern: str, fields: Sequence[str]) -> list[int]:
    """The pattern's levels as the pair model reads them: a missing record field is a
    disagreement, as in recordlinkage's ECM (``missing_value=0``). The pattern itself keeps
    "missing" to explain the pair. Chosen by measurement: the hard non-duplicates of DupeHell's
    sets are sparse records that copy a few fields of another, and a separate "missing" level
    let EM learn that dropped fields mean a copy (books F1 0.978 -> 0.997, restaurants 0.972
    -> 0.984; FEBRL3 0.984 -> 0.985; leaving a missing field out of the likelihood was worse)."""
    records = record_columns(fields)
    return [int(DISAGREE) if c == MISSING and records[k] else int(c) for k, c in enumerate(pattern)]


def fit_fields(patterns: Mapping[str, int], fields: Sequence[str]) -> FieldModel | None:
    """EM for the two-class Fellegi-Sunter model over pattern counts (no labels), over the
    levels ``model_levels`` reads; every level keeps a pseudo-count (``PSEUDO_PAIRS``, ``PSEUDO_SHARE``)."""
    keys = [p for p in patterns if len(p) == len(fields)]
    if not keys or not fields:
        return None
    x = np.array([model_levels(p, fields) for p in keys])
    weight = np.array([patterns[p] for p in keys], dtype=np.float64)
    k = np.arange(len(fields))
    m = np.tile([0.85, 0.05, 0.05, 0.05], (len(fields), 1))  # duplicates mostly agree
    u = np.tile([0.1, 0.2, 0.1, 0.6], (len(fields), 1))
    prior = 0.1
    for _ in range(EM_ITERATIONS):
        log_m = math.log(prior) + np.log(m[k, x]).sum(axis=1)
        log_u = math.log(1 - prior) + np.log(u[k, x]).sum(axis=1)
        g = 1.0 / (1.0 + np.exp(np.clip(log_u - log_m, -700, 700)))
        prior = float(np.clip((g * weight).sum() / weight.sum(), 1e-4, 1 - 1e-4))
        smooth_m = PSEUDO_PAIRS + PSEUDO_SHARE * (g * weight).sum()
        smooth_u = PSEUDO_PAIRS + PSEUDO_SHARE * ((1 - g) * weight).sum()
        for level in range(LEVELS):
            at = (x == level)
            m[:, level] = ((g * weight)[:, None] * at).sum(axis=0) + smooth_m
            u[:, level] = (((1 - g) * weight)[:, None] * at).sum(axis=0) + smooth_u
        m /= m.sum(axis=1, keepdims=True)
        u /= u.sum(axis=1, keepdims=True)
    if m[:, int(AGREE)].mean() < u[:, int(AGREE)].mean():  # the classes came out swapped
        m, u, prior = u, m, 1 - prior
    return FieldModel(tuple(fields), tuple(tuple(round(max(float(v), 1e-6), 6) for v in row) for row in m),
                      tuple(tuple(round(max(float(v), 1e-6), 6) for v in row) for row in u), round(prior, 6))
