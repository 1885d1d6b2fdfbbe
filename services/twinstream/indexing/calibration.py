"""Per-collection calibration: what decides a tenant/collection, fitted on its own stream, no labels.

A bundle's thresholds are fitted to its training data; on a user's own data they do not hold.
So every tenant/collection keeps, online, what its own items look like to the encoder:

* **OOD reference**: the best-neighbour similarity of its in-distribution items. An item whose
  best neighbour is less similar than nearly all of them (below ``ood_floor``) is unlike this
  collection and is refused. During warm-up (the first ``WARMUP_ITEMS``) nothing is refused as
  OOD: the collection's first items *are* its reference, whatever the bundle's detector says.
* **Duplicate threshold**, by target-decoy false-discovery control: each item's best neighbour is
  a *target* (a duplicate or the best non-duplicate), its runner-up from another cluster a
  *decoy* (almost never a duplicate). Above a threshold ``t`` the estimated share of false calls
  is ``#decoys >= t / #targets >= t``; the duplicate threshold is the lowest ``t`` where that
  stays within ``1 - TARGET_PRECISION``, the match threshold the lowest within ``MATCH_FDR``.

Refitted when the observed item count doubles (then every ``REFIT_EVERY``), over the last
``WINDOW`` observations; every fit is a new ``version`` that each decision names, so a decision
can always be traced to the calibration that made it. Pure: no IO (see ``CalibrationStore``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

WARMUP_ITEMS = 50
WINDOW = 2048  # observations kept (a persisted state stays under Milvus's 64 KiB string)
REFIT_EVERY = 1024
TARGET_PRECISION = 0.95
MATCH_FDR = 0.5
OOD_QUANTILE = 0.01  # reference items below the floor: in-distribution items refused, at most
OOD_MARGIN = 0.5  # the floor sits this share of the (median - quantile) spread below the quantile
MIN_TARGETS = 3  # a threshold needs at least this many targets above it


@dataclass(frozen=True)
class Calibration:
    """What decides one tenant/collection at a time; version 0 is the bundle's prior."""

    version: int = 0
    duplicate: float = math.inf
    match: float = math.inf
    ood_floor: float = -math.inf  # -inf: nothing refused (warm-up)
    fitted_on: int = 0

    @property
    def warm(self) -> bool:
        return self.version > 0


@dataclass(frozen=True)
class Observation:
    """What one decided, in-distribution item tells the calibration: its best neighbour's
    similarity and its best from another cluster (the decoy); NaN where there was none."""

    best: float
    decoy: float


@dataclass
class CollectionState:
    """The online state of one tenant/collection, persisted by the indexer between batches."""

    items: int = 0
    best: list[float] = field(default_factory=list)
    decoy: list[float] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)

    def observe(self, observation: Observation) -> bool:
        """Add one item; refit when due. Returns whether the calibration changed."""
        self.items += 1
        # rounded as stored, so a state read back after a restart fits exactly as one kept in memory
        self.best = [*self.best[-(WINDOW - 1):], round(observation.best, 4)]
        self.decoy = [*self.decoy[-(WINDOW - 1):], round(observation.decoy, 4)]
        if self.items < next_fit(self.calibration):
            return False
        self.calibration = fit(self.best, self.decoy, self.items, self.calibration)
        return True

    def to_json(self) -> str:
        # NaN and inf are not JSON: store them as null and as strings
        def clean(value: float) -> float | str | None:
            return None if math.isnan(value) else (str(value) if math.isinf(value) else value)

        return json.dumps({"items": self.items, "best": [clean(v) for v in self.best],
                           "decoy": [clean(v) for v in self.decoy],
                           "calibration": {k: clean(v) for k, v in asdict(self.calibration).items()}},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CollectionState:
        def num(value: float | str | None) -> float:
            return math.nan if value is None else float(value)

        raw = json.loads(text)
        c = raw["calibration"]
        return cls(int(raw["items"]), [num(v) for v in raw["best"]], [num(v) for v in raw["decoy"]],
                   Calibration(int(c["version"]), num(c["duplicate"]), num(c["match"]), num(c["ood_floor"]),
                               int(c["fitted_on"])))


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
    return Calibration(previous.version + 1, duplicate, match, ood_floor(targets), items)
