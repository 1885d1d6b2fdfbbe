"""OOD relative to the collection: are foreign items refused, and in-distribution ones kept?

A collection's stream with foreign items interleaved (``SHARE`` of its length, at seeded
positions after the warm-up) goes through the same replay the decisions use
(``bench.methods.replay``, fitted on the collection). Foreign items are of another kind than the
collection's: Python standard-library source (``inspect.getsource``, offline) sent as records
into record collections and as text into text ones; rendered text pages (PIL, default font,
black on white, page-like sizes) sent as images into image collections. The indexer refuses on
two scores, each reported: the best accepted neighbour's cosine (lower = more foreign) and, for
text and images, the content-profile distance to the collection's reference (higher = more
foreign; ``indexing.profile``); the quality tables stay computed on the clean stream.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from bench.methods import Stream, embed_stream, replay
from twinstream.common.encoding import ItemEncoder
from twinstream.indexing.calibration import WARMUP_ITEMS
from twinstream.learn.calibration import roc_auc
from twinstream.v1 import decisions_pb2, items_pb2

SHARE = 0.05
# stdlib modules of plain Python source, read offline (their functions are the snippets)
MODULES = ("json.decoder", "json.encoder", "textwrap", "shutil", "statistics", "csv", "difflib", "argparse",
           "calendar", "fractions", "heapq", "bisect", "shlex", "string", "tempfile", "zipfile", "tarfile",
           "configparser", "ipaddress", "pprint", "base64", "glob", "fnmatch", "posixpath", "gettext")
MAX_CHARS = 2000  # a snippet's head: a function or a method, as an item of ordinary size
PAGE_SIZES = ((420, 594), (500, 700), (612, 792))  # A5-like, portrait, US letter at 72 dpi


def code_snippets() -> list[str]:
    """Every function and method of ``MODULES`` with at least 3 lines of source, in a fixed order."""
    snippets: list[str] = []
    seen: set[str] = set()
    for name in MODULES:
        module = importlib.import_module(name)
        members = [m for _, m in inspect.getmembers(module)]
        members += [f for _, c in inspect.getmembers(module, inspect.isclass) for _, f in inspect.getmembers(c)]
        for member in members:
            if not inspect.isfunction(member) or getattr(member, "__module__", None) != module.__name__:
                continue
            try:
                source = inspect.getsource(member)
            except (OSError, TypeError):
                continue
            source = inspect.cleandoc(source)[:MAX_CHARS]
            if source.count("\n") >= 2 and source not in seen:
                seen.add(source)
                snippets.append(source)
    return snippets


def text_page(text: str, rng: random.Random) -> bytes:
    """``text`` rendered as a page: black default-font lines on white, PNG."""
    width, height = rng.choice(PAGE_SIZES)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    margin, y = 30, 30
    for line in text.splitlines():
        if y > height - margin:
            break
        draw.text((margin, y), line[:90], fill="black")
        y += 14
    out = io.BytesIO()
    page.save(out, format="PNG")
    return out.getvalue()


def foreign_contents(modality: items_pb2.Modality.ValueType, count: int, seed: int) -> tuple[list[bytes], str]:
    """``count`` items of a foreign kind for a collection of ``modality``, and what they are."""
    rng = random.Random(seed)
    snippets = code_snippets()
    chosen = [snippets[i] for i in rng.sample(range(len(snippets)), min(count, len(snippets)))]
    if modality == items_pb2.RECORD:
        return [json.dumps({"source": s}).encode() for s in chosen], "Python stdlib source as records"
    if modality == items_pb2.TEXT:
        return [s.encode() for s in chosen], "Python stdlib source as text"
    return [text_page(s, rng) for s in chosen], "rendered text pages (stdlib source) as images"


def interleave(stream: Stream, foreign: Sequence[bytes], seed: int,
               warmup: int = WARMUP_ITEMS) -> tuple[Stream, np.ndarray]:
    """The stream with the foreign items inserted at seeded positions after the first ``warmup`` + 1
    items (the clean stream's order kept), and which positions are foreign."""
    rng = random.Random(seed)
    slots = sorted(rng.choices(range(min(warmup + 1, len(stream)), len(stream) + 1), k=len(foreign)))
    ids, entities, contents, is_foreign = [], [], [], []
    k = 0
    for i in range(len(stream) + 1):
        while k < len(slots) and slots[k] == i:
            ids.append(f"foreign-{k}")
            entities.append(f"foreign-{k}")
            contents.append(foreign[k])
            is_foreign.append(True)
            k += 1
        if i < len(stream):
            ids.append(stream.ids[i])
            entities.append(stream.entities[i])
            contents.append(stream.contents[i])
            is_foreign.append(False)
    return Stream(ids, entities, contents, stream.modality), np.asarray(is_foreign)


def auroc(inside: Sequence[float] | np.ndarray, foreign: Sequence[float] | np.ndarray) -> float:
    """P(a foreign item scores below an in-distribution one), ties counted half (NaN if either is empty)."""
    a, b = np.asarray(inside, dtype=np.float64), np.asarray(foreign, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan
    # the project's ROC-AUC, foreign items the positive class and a lower cosine the higher score
    return roc_auc(-np.concatenate([a, b]), np.concatenate([np.zeros(len(a), bool), np.ones(len(b), bool)]))


@dataclass(frozen=True)
class OodResult:
    """One collection's OOD measurement (fractions of the items of each kind)."""

    bundle: str
    foreign_kind: str
    items: int  # in-distribution items
    foreign: int
    inside_refused: int
    inside_refused_share: float
    foreign_refused_share: float
    auroc: float  # best-neighbour cosine, in-distribution items after the warm-up vs foreign items
    # each foreign item alone: its best cosine to the earlier in-distribution items only (as if it were
    # the first of its kind), against the floor in force; earlier foreign items accepted join the
    # collection's neighbourhood and shield later ones, which the stream numbers above include. Its
    # profile distance counts too (refused above the limit in force): a reference's K-th nearest
    # profile is not shielded by fewer than K accepted foreign items (``indexing.profile``)
    foreign_refused_alone_share: float
    auroc_alone: float  # of the cosine alone
    # the content-profile distance, where one was measured (text, images after the warm-up); NaN: none
    auroc_profile: float = math.nan
    foreign_refused_by_profile_share: float = math.nan
    foreign_refused: int = 0
    foreign_profiled: int = 0  # foreign items decided while a profile reference was in force (after its fit)
    collections: int = 1  # collections pooled in this result (``pooled``)


def measure(label: str, encoder: ItemEncoder, stream: Stream, seed: int, share: float = SHARE) -> OodResult:
    """The collection's stream with ``share`` foreign items, replayed fitted on the collection."""
    count = max(1, round(share * len(stream)))
    contents, kind = foreign_contents(stream.modality, count, seed)
    mixed, is_foreign = interleave(stream, contents, seed)
    embedded = embed_stream(encoder, mixed)
    replayed = replay(encoder.bundle, mixed, embedded, calibrated=True)
    refused = np.asarray([d.kind == decisions_pb2.OUT_OF_DISTRIBUTION for d in replayed.decisions])
    best = np.asarray(replayed.best, dtype=np.float64)
    scored = (np.arange(len(mixed)) >= WARMUP_ITEMS) & ~np.isnan(best)
    inside = np.flatnonzero(~is_foreign)
    alone = np.asarray([float(np.max(embedded.vectors[inside[inside < i]] @ embedded.vectors[i]))
                        for i in np.flatnonzero(is_foreign)])
    floors = np.asarray([replayed.decisions[i].thresholds.ood_similarity for i in np.flatnonzero(is_foreign)])
    limits = np.asarray([d.thresholds.ood_profile for d in replayed.decisions], dtype=np.float64)
    distance = np.asarray([d.profile_distance for d in replayed.decisions], dtype=np.float64)
    profiled = np.isfinite(limits)
    by_profile = profiled & (distance > limits)
    inside_refused = int(refused[~is_foreign].sum())
    return OodResult(label, kind, len(inside), int(is_foreign.sum()), inside_refused,
                     inside_refused / max(1, len(inside)),
                     float(refused[is_foreign].mean()) if is_foreign.any() else math.nan,
                     auroc(best[scored & ~is_foreign], best[scored & is_foreign]),
                     float(((alone < floors) | by_profile[is_foreign]).mean()) if len(alone) else math.nan,
                     auroc(best[scored & ~is_foreign], alone),
                     # a higher distance is more foreign: negated for ``auroc``'s lower-is-foreign
                     auroc(-distance[profiled & ~is_foreign], -distance[profiled & is_foreign]),
                     float(by_profile[is_foreign].mean()) if profiled[is_foreign].any() else math.nan,
                     int(refused[is_foreign].sum()), int(profiled[is_foreign].sum()))


def pooled(results: Sequence[OodResult]) -> OodResult:
    """Several collections' results as one: counts summed, shares over the pooled items; AUROCs,
    which do not pool across collections' references, NaN."""
    first = results[0]
    items, foreign = sum(r.items for r in results), sum(r.foreign for r in results)
    inside_refused, refused = sum(r.inside_refused for r in results), sum(r.foreign_refused for r in results)
    profiled = sum(r.foreign_profiled for r in results)
    by_profile = sum(r.foreign_refused_by_profile_share * r.foreign for r in results if r.foreign_profiled)
    alone = sum(r.foreign_refused_alone_share * r.foreign for r in results if r.foreign)
    return OodResult(first.bundle, first.foreign_kind, items, foreign, inside_refused,
                     inside_refused / max(1, items), refused / foreign if foreign else math.nan,
                     math.nan, alone / foreign if foreign else math.nan, math.nan, math.nan,
                     by_profile / foreign if profiled else math.nan, refused, profiled, len(results))
