"""Content profiles: what an item's content looks like beside its vector, for the OOD rule.

The best-neighbour cosine cannot refuse every foreign item: to an encoder a foreign item's
nearest neighbour is often close enough (Python source to a text encoder of prose, a rendered
text page to an image encoder of icons), and once one is accepted the next one's best
neighbour is that one. A profile is a handful of cheap statistics of the content itself
(text: character classes, lines, words; images: background, saturation, grey levels, strokes).
A collection keeps the profiles of its accepted items; at each fit they become a reference
(``ProfileReference``): per feature the median and a robust scale, the profiles, and a limit
fitted on the reference's own leave-one-out distances (no labels). An item's distance is to its
``K``-th nearest reference profile, so fewer than ``K`` accepted foreign items cannot make the
next one look typical, and the limit rests on the distances' q90, which a tenth of the reference
would have to be foreign to move. Pure and deterministic (values rounded as stored): a replay
repeats the distances. Chosen by measurement: docs/calibration.md.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

DIGITS = 3  # profiles are rounded so that a state read back from JSON fits exactly as in memory
DROP = 1  # a pair's most different feature(s) left out of its distance (``_norm``)
K = 5  # the distance to the K-th nearest reference profile: K - 1 accepted look-alikes do not shield one
MIN_REFERENCE = 40  # profiles a reference needs before it refuses anything
LIMIT_QUANTILE = 0.9  # robust: the limit holds until a tenth of the reference is foreign
LIMIT_MARGIN = 3.0  # the limit sits this many (q90 - median) spreads above the q90 (2.5 refused a real copy)
IMAGE_LIMIT_RATIO = 1.25  # an image reference's limit: at most this times its 2nd-largest leave-one-out distance
MIN_LIMIT = 0.5  # never below: within half a scaled unit of its K-th neighbour nothing is foreign
CLIP = 16.0  # a feature's scaled deviation counts at most this much (a zero-spread feature stays finite)
MIN_SCALE = 0.02  # the floor of a feature's scale (features are shares or logs of order one)
_CODE_CHARS = frozenset("(){}[]=_:;<>*/\\|&%#@")
THUMB = 256
ROWS_SIDE = 1024  # blank rows are looked for at up to this many pixels on the long side
DARK = 0.6  # grey level (0-1) below which a pixel is dark: a stroke, not background


def text_profile(text: str) -> list[float]:
    """Shares of letters, digits, whitespace, code punctuation (``_CODE_CHARS``), other
    punctuation and capitals (of letters); newlines per 100 characters, indented lines, log
    mean word length and log mean line length."""
    n = max(1, len(text))
    letters = sum(c.isalpha() for c in text)
    lines = [line for line in text.splitlines() if line.strip()] or [""]
    words = text.split()
    values = (
        letters / n,
        sum(c.isdigit() for c in text) / n,
        sum(c.isspace() for c in text) / n,
        sum(c in _CODE_CHARS for c in text) / n,
        sum(c in ".,!?'\"-" for c in text) / n,
        sum(c.isupper() for c in text) / max(1, letters),
        min(1.0, 100 * text.count("\n") / n),
        sum(line[:1].isspace() for line in lines) / len(lines),
        math.log1p(sum(len(w) for w in words) / max(1, len(words))),
        math.log1p(sum(len(line) for line in lines) / len(lines)),
    )
    return [round(float(v), DIGITS) for v in values]


def image_profile(image: Image.Image) -> list[float]:
    """Of a ``THUMB``-pixel square thumbnail: the near-white share, mean saturation, grey-level
    entropy (of 32 levels, in units of its maximum), the share of horizontally adjacent pixels
    that change between light and dark (strokes) and the mean grey level; of the image at up to
    ``ROWS_SIDE`` pixels: the share of its rows without a dark pixel (a page's margins and line
    gaps; a photo has almost none). Brightness and blank rows tell a white page from the dark,
    flat photos that the first four put beside it. Chosen by measurement over a wider set
    (near-black share, colourfulness, distinct colours, edge density, ink share, text-line
    changes, row periodicity, aspect ratio): these six kept every in-distribution image and
    separated rendered text pages best (docs/calibration.md)."""
    rgb_image = image.convert("RGB")
    thumb = rgb_image.resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    rgb = np.asarray(thumb, dtype=np.float64) / 255.0
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue)
    saturation = (high - low) / np.maximum(high, 1e-9)  # 0 where black (high 0)
    histogram = np.bincount(np.minimum((grey * 32).astype(np.int64), 31).ravel(), minlength=32) / grey.size
    present = histogram[histogram > 0]
    dark = grey < DARK
    values = (
        float(np.mean(low > 0.92)),
        float(saturation.mean()),
        -float(np.sum(present * np.log2(present))) / 5.0,
        float(np.mean(dark[:, 1:] != dark[:, :-1])),
        float(grey.mean()),
        blank_row_share(rgb_image),
    )
    return [round(v, DIGITS) for v in values]


def blank_row_share(image: Image.Image) -> float:
    """The share of the image's rows (at most ``ROWS_SIDE`` pixels on its long side, so a page's
    thin strokes stay dark, unlike in the thumbnail) without a pixel darker than ``DARK``."""
    grey = image.convert("L")
    if max(grey.size) > ROWS_SIDE:
        ratio = ROWS_SIDE / max(grey.size)
        grey = grey.resize((max(1, round(grey.width * ratio)), max(1, round(grey.height * ratio))),
                           Image.Resampling.BILINEAR)
    rows_dark = (np.asarray(grey, dtype=np.float64) / 255.0 < DARK).any(axis=1)
    return float(np.mean(~rows_dark))


@dataclass(frozen=True)
class ProfileReference:
    """A collection's profiles at a fit: the per-feature median and scale, the profiles (raw,
    rounded) and the distance limit above which an item is unlike them."""

    center: tuple[float, ...]
    scale: tuple[float, ...]
    profiles: tuple[tuple[float, ...], ...]
    limit: float

    def distance(self, profile: Sequence[float]) -> float:
        """The item's distance to its ``K``-th nearest reference profile (NaN when the profile
        does not fit the reference: another kind of item or another feature set)."""
        if len(profile) != len(self.center) or not self.profiles:
            return math.nan
        own = _scaled(np.asarray([profile], dtype=np.float64), self.center, self.scale)
        return kth_distance(_norm(self._scaled_profiles - own))

    @cached_property
    def _scaled_profiles(self) -> np.ndarray:
        """The reference's profiles scaled once: every text or image item of the collection is
        measured against them until the next fit."""
        return _scaled(np.asarray(self.profiles, dtype=np.float64), self.center, self.scale)

    def to_json(self) -> dict[str, object]:
        return {"center": list(self.center), "scale": list(self.scale),
                "profiles": [list(p) for p in self.profiles], "limit": self.limit}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ProfileReference:
        return cls(tuple(float(v) for v in raw["center"]), tuple(float(v) for v in raw["scale"]),
                   tuple(tuple(float(v) for v in p) for p in raw["profiles"]), float(raw["limit"]))


def _scaled(profiles: np.ndarray, center: Sequence[float], scale: Sequence[float]) -> np.ndarray:
    return np.clip((profiles - np.asarray(center)) / np.asarray(scale), -CLIP, CLIP)


def _norm(differences: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last axis without its ``DROP`` largest components: an item that
    differs from a profile in one feature alone (a photo on a white background among photos
    without) is not foreign; a foreign kind differs in several (code: punctuation, indentation,
    lines, words; a text page: background, colour, grey levels, strokes)."""
    squared = np.sort(differences ** 2, axis=-1)
    return np.asarray(np.sqrt(squared[..., :squared.shape[-1] - DROP].sum(axis=-1)))


def kth_distance(distances: np.ndarray, k: int = K) -> float:
    """The ``k``-th smallest of ``distances`` (the largest when there are fewer)."""
    if not len(distances):
        return math.nan
    return float(np.partition(distances, min(k, len(distances)) - 1)[min(k, len(distances)) - 1])


def fit_reference(profiles: Sequence[Sequence[float]], max_ratio: float = math.inf) -> ProfileReference | None:
    """The reference of a collection's accepted items' profiles, those of the most common length
    (``None``: fewer than ``MIN_REFERENCE``). Scale: 1.4826 MAD, else the mean absolute
    deviation (a feature most items share exactly), floored at ``MIN_SCALE``. Limit: the
    leave-one-out distances' ``LIMIT_QUANTILE`` plus ``LIMIT_MARGIN`` times its distance above
    their median, at most ``max_ratio`` times their second largest, at least ``MIN_LIMIT``.

    ``max_ratio`` (images: ``IMAGE_LIMIT_RATIO``): a young, varied collection's quantiles are far
    apart, and the margin above them reached twice as far as any of its items lies from its
    neighbours, where rendered text pages sat among photos. The second largest, not the largest:
    one odd item of the collection (a white crop among photos) does not set the cap alone, nor
    does one foreign item accepted earlier; past two, the quantile rule decides again. Text
    keeps no cap (``inf``): real copies of its later paragraphs lay beyond the reference's largest
    distance (docs/calibration.md)."""
    if not profiles:
        return None
    size = Counter(len(p) for p in profiles).most_common(1)[0][0]
    kept = [tuple(float(v) for v in p) for p in profiles if len(p) == size]
    if len(kept) < MIN_REFERENCE:
        return None
    x = np.asarray(kept, dtype=np.float64)
    center = np.median(x, axis=0)
    deviation = np.abs(x - center)
    scale = np.maximum(np.maximum(1.4826 * np.median(deviation, axis=0), deviation.mean(axis=0)), MIN_SCALE)
    center_t = tuple(round(float(v), 6) for v in center)
    scale_t = tuple(round(float(v), 6) for v in scale)
    scaled = _scaled(x, center_t, scale_t)
    pairwise = _norm(scaled[:, None, :] - scaled[None, :, :])
    np.fill_diagonal(pairwise, np.inf)  # leave one out
    loo = np.asarray([kth_distance(row) for row in pairwise])
    high, mid = np.quantile(loo, [LIMIT_QUANTILE, 0.5])
    limit = float(high + LIMIT_MARGIN * (high - mid))
    if math.isfinite(max_ratio):  # (inf x a zero distance would be NaN)
        limit = min(limit, max_ratio * float(np.sort(loo)[-2]))
    return ProfileReference(center_t, scale_t, tuple(kept), round(max(MIN_LIMIT, limit), 6))


def of_signals(signals: Mapping[str, object] | None) -> tuple[float, ...]:
    """The content profile in an item's signals (empty: none, e.g. a record)."""
    profile = signals.get("profile") if signals else None
    if not isinstance(profile, list) or not all(isinstance(v, int | float) for v in profile):
        return ()
    return tuple(float(v) for v in profile)
