"""``twinstream adapt``: self-supervised Siamese fine-tuning on one collection's own items.

No labels: every item is its own entity, and its positives are corruptions of it made field by
field (typos, abbreviations, dropped, swapped, merged and reformatted fields for records; the
trainer's text edits for prose). The tower starts from the same pretrained MiniLM as ``train``,
trains with the shared loop (``train.fit``), and is calibrated on the collection itself:

* OOD prototypes fitted on the collection's items (so its own stream is in distribution), plus
  the other kind the bundle serves, from its usual data, so that kind keeps its thresholds;
* duplicate/match thresholds and Platt scaling from a simulated stream of held-out items with
  0-3 corrupted copies each: the rule ``calibrate`` applies everywhere (precision 0.95).

The result is a new version of the text-family bundle, ready for ``twinstream reembed`` and
``twinstream promote``. Images are not adapted here (the image tower has no pretrained base to
start from on a few hundred items).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twinstream.learn import sources
from twinstream.learn.augment import _typo, perturb_text
from twinstream.learn.data import Splits, ViewSet
from twinstream.learn.modalities import TEXT_BUNDLE, DataSizes, ModelOptions, RecordModality, TextFamily, TextModality
from twinstream.model.records import serialize_record

KINDS = ("record", "text")
ABBREVIATIONS = {
    "street": "st", "avenue": "ave", "road": "rd", "boulevard": "blvd", "drive": "dr", "lane": "ln",
    "court": "ct", "place": "pl", "square": "sq", "north": "n", "south": "s", "east": "e", "west": "w",
    "company": "co", "corporation": "corp", "incorporated": "inc", "limited": "ltd", "international": "intl",
    "group": "grp", "university": "univ", "department": "dept", "saint": "st", "mount": "mt",
    "and": "&", "restaurant": "rest", "edition": "ed", "volume": "vol", "number": "no", "journal": "j",
    "proceedings": "proc", "conference": "conf", "international conference": "intl conf",
}
_DATE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})")


class AdaptError(ValueError):
    """The items cannot be adapted on (too few, wrong kind); the message says what to change."""


# -- field-aware corruptions -------------------------------------------------------------------
def _words_edit(value: str, rng: random.Random, edit: Callable[[list[str], random.Random], list[str]]) -> str:
    words = value.split()
    return " ".join(edit(words, rng) or words) if words else value


def _typos(value: str, rng: random.Random) -> str:
    return _words_edit(value, rng, lambda ws, r: [_typo(w, r) if r.random() < 0.3 else w for w in ws]
                       if len(ws) > 1 else [_typo(ws[0], r)])


def _abbreviate(value: str, rng: random.Random) -> str:
    def edit(words: list[str], r: random.Random) -> list[str]:
        out = []
        for word in words:
            short = ABBREVIATIONS.get(word.lower())
            if short and r.random() < 0.8:
                out.append(short)
            elif len(word) > 3 and word.isalpha() and r.random() < 0.25:
                out.append(word[0] + ("." if r.random() < 0.5 else ""))  # initial
            else:
                out.append(word)
        return out
    return _words_edit(value, rng, edit)


def _drop_words(value: str, rng: random.Random) -> str:
    return _words_edit(value, rng, lambda ws, r: [w for w in ws if r.random() > 0.25] if len(ws) > 2 else ws)


def _reformat(value: str, rng: random.Random) -> str:
    """Another spelling of the same value: date order, digit grouping, case, punctuation."""
    date = _DATE.match(value)
    if date:
        y, m, d = date.groups()
        return rng.choice([f"{d}-{m}-{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{y}{int(m):02d}{int(d):02d}"])
    digits = re.sub(r"\D", "", value)
    if len(digits) >= 6 and len(digits) >= len(value) // 2:
        return rng.choice([digits, " ".join(digits[i:i + 3] for i in range(0, len(digits), 3)),
                           "-".join(digits[i:i + 4] for i in range(0, len(digits), 4))])
    style = rng.choice([str.upper, str.lower, str.title, lambda s: re.sub(r"[.,;:'\"()-]", "", s)])
    return str(style(value))


VALUE_EDITS: list[Callable[[str, random.Random], str]] = [_typos, _abbreviate, _drop_words, _reformat]


def corrupt_record(record: dict[str, str], rng: random.Random) -> dict[str, str]:
    """A plausible dirty copy: one to three field-aware edits (a value typed, abbreviated, cut or
    reformatted; a field dropped; two fields' values swapped; a field merged into another); never
    the record itself (an edit can happen to change nothing, e.g. swapping equal letters)."""
    if not record:
        return {}
    for _ in range(10):
        fields = _edit_fields(record, rng)
        if fields != record:
            return fields
    name = rng.choice(sorted(record))
    return {**record, name: record[name] + " " + record[name][:1]}  # a stutter: rare fallback


def _edit_fields(record: dict[str, str], rng: random.Random) -> dict[str, str]:
    fields = dict(record)
    for _ in range(rng.randint(1, 3)):
        names = [k for k, v in fields.items() if v]
        if not names:
            break
        kind = rng.random()
        if kind < 0.6 or len(names) < 2:
            name = rng.choice(names)
            fields[name] = rng.choice(VALUE_EDITS)(fields[name], rng)
        elif kind < 0.8:
            del fields[rng.choice(names)]
        elif kind < 0.9:
            a, b = rng.sample(names, 2)
            fields[a], fields[b] = fields[b], fields[a]
        else:
            a, b = rng.sample(names, 2)
            fields[a] = f"{fields[a]} {fields.pop(b)}"
    return fields


# -- the collection as a modality -------------------------------------------------------------
@dataclass(frozen=True)
class CollectionItems:
    """One collection's items as encoder views (serialised records or text), all one kind."""

    kind: str
    views: list[str]
    originals: list[Any]  # the parsed records (dicts) or texts, for the corruptions

    def corrupt(self, index: int, rng: random.Random) -> str:
        if self.kind == "record":
            corrupted: dict[str, object] = {**corrupt_record(self.originals[index], rng)}
            return serialize_record(corrupted, sources.FEBRL_FIELDS)
        return perturb_text(self.originals[index], rng)


def collection_items(items: Sequence[tuple[str, bytes]]) -> CollectionItems:
    """(kind, content) pairs -> the views of the collection's main kind (records or text)."""
    counts = Counter(kind for kind, _ in items)
    if not counts:
        raise AdaptError("no items: the collection is empty, or the filter matched nothing")
    kind = counts.most_common(1)[0][0]
    if kind not in KINDS:
        raise AdaptError(f"adapt works on record and text collections; this one holds {kind} items")
    originals: list[Any] = []
    for item_kind, content in items:
        if item_kind != kind:
            continue
        if kind == "record":
            record = json.loads(content)
            if not isinstance(record, dict):
                raise AdaptError("a record item is not a JSON object")
            originals.append({str(k): str(v) for k, v in record.items() if v is not None and str(v).strip()})
        else:
            originals.append(content.decode("utf-8"))
    views = [serialize_record(o, sources.FEBRL_FIELDS) if kind == "record" else o for o in originals]
    return CollectionItems(kind, views, originals)


class CollectionModality(TextFamily):
    """The text family with the collection's own data: training and validation views from its
    items and their corruptions; OOD prototypes on its items plus the other kind's usual data."""

    def __init__(self, items: CollectionItems, splits: Splits[Any], reference: list[str], heldout: list[str],
                 description: str, options: ModelOptions | None = None) -> None:
        super().__init__(options)
        self.name = items.kind
        self.items = items
        self.splits = splits
        self.reference, self.heldout = reference, heldout
        self.data_description = description

    def _other(self) -> TextFamily:
        return TextModality(self.options) if self.name == "record" else RecordModality(self.options)

    def load_splits(self, sizes: DataSizes, seed: int) -> Splits[Any]:
        return self.splits

    def in_distribution(self, sizes: DataSizes, seed: int) -> tuple[list[Any], dict[str, list[Any]]]:
        other = self._other()
        half = DataSizes(train_entities=sizes.reference_views, eval_views=sizes.reference_views // 2)
        other_splits = other.load_splits(half, seed)
        rng = random.Random(seed)
        other_fit = rng.sample(other_splits.train.views, min(len(other_splits.train), sizes.reference_views // 2))
        return self.reference + other_fit, {self.name: self.heldout, other.name: other_splits.val.views}

    def calibration_sets(self, val: ViewSet[Any], sizes: DataSizes,
                         seed: int) -> dict[str, tuple[ViewSet[Any], str]]:
        other = self._other()
        other_val = other.load_splits(DataSizes(train_entities=0, eval_views=sizes.eval_views), seed).val
        return {self.name: (val, self.data_description), other.name: (other_val, other.data_description)}


@dataclass(frozen=True)
class AdaptConfig:
    """Small by default: minutes on two CPU cores for a few hundred items."""

    epochs: int = 2
    copies: int = 3               # corrupted views per training item (plus the item itself)
    batch_entities: int = 32
    max_items: int = 2000         # items used at most (a seeded sample)
    val_items: int = 200          # held out for the thresholds, with 0-3 corrupted copies each
    text_tuning: str = "finetune"
    trainable_layers: int = 2
    learning_rate: float | None = None
    loss: str = "infonce"
    temperature: float = 0.05
    seed: int = 0
    device: str = "auto"
    calibration_views: int = 300  # views of the other kind, for its thresholds and OOD reference


def _trigrams(text: str) -> set[str]:
    norm = " ".join(re.findall(r"\w+", text.lower()))
    return {norm[i:i + 3] for i in range(max(1, len(norm) - 2))}


def distinct(ids: list[int], views: list[str], max_jaccard: float = 0.5) -> list[int]:
    """``ids`` without the items that look like a duplicate of an earlier one (character-trigram
    Jaccard >= ``max_jaccard``): the collection's own duplicates are unlabelled, and the held-out
    stream's thresholds must only see the corruptions as duplicates."""
    kept: list[tuple[int, set[str]]] = []
    for i in ids:
        grams = _trigrams(views[i])
        if all(len(grams & other) < max_jaccard * len(grams | other) for _, other in kept):
            kept.append((i, grams))
    return [i for i, _ in kept]


def build_splits(items: CollectionItems, config: AdaptConfig) -> tuple[Splits[Any], list[str], list[str]]:
    """Training views (each item and ``copies`` corruptions), a validation stream (held-out items
    with 0-3 corruptions each), and the OOD reference / held-out in-distribution views."""
    if len(items.views) < 20:
        raise AdaptError(f"{len(items.views)} items are too few to adapt on: ingest at least 20")
    rng = random.Random(config.seed)
    order = list(range(len(items.views)))
    rng.shuffle(order)
    order = order[:config.max_items]
    n_val = min(config.val_items, len(order) // 4)
    val_ids, train_ids = order[:n_val], order[n_val:]
    val_ids = distinct(val_ids, items.views)  # a real duplicate there would count as a false positive
    train: ViewSet[Any] = ViewSet()
    for i in train_ids:
        train.add(items.views[i], f"item-{i}")
        for _ in range(config.copies):
            train.add(items.corrupt(i, rng), f"item-{i}")
    val: ViewSet[Any] = ViewSet()
    for i in val_ids:
        val.add(items.views[i], f"item-{i}")
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            val.add(items.corrupt(i, rng), f"item-{i}")
    half = len(train_ids) // 2
    reference = [items.views[i] for i in train_ids[:half]]
    heldout = [items.views[i] for i in train_ids[half:]] + [items.views[i] for i in val_ids]
    return Splits(train, val, ViewSet()), reference, heldout


def adapt(items: Sequence[tuple[str, bytes]], out_dir: Path, version: str, config: AdaptConfig,
          source: dict[str, object], progress: bool = True) -> dict[str, object]:
    """Fine-tune on the items, calibrate on them, write the bundle; returns its manifest."""
    from twinstream.learn.bundle import calibrate_model, write_bundle
    from twinstream.learn.encoders import resolve_device
    from twinstream.learn.train import TrainConfig, fit, seed_everything

    started = time.perf_counter()
    collection = collection_items(items)
    splits, reference, heldout = build_splits(collection, config)
    description = (f"{source.get('what', 'the collection')}: {len(splits.val.by_entity())} held-out items with "
                   "0-3 field-aware corruptions each (no labels)")
    options = ModelOptions(text_tuning=config.text_tuning, trainable_layers=config.trainable_layers)
    modality = CollectionModality(collection, splits, reference, heldout, description, options)
    seed_everything(config.seed)
    model = modality.build_model(config.seed)
    sizes = DataSizes(train_entities=len(splits.train.by_entity()), eval_views=config.calibration_views,
                      reference_views=config.calibration_views, ood_views=0)
    train_config = TrainConfig(modality=collection.kind, loss=config.loss, temperature=config.temperature,
                               epochs=config.epochs, batch_entities=config.batch_entities,
                               learning_rate=config.learning_rate, seed=config.seed, device=config.device,
                               sizes=sizes, options=options)
    history = fit(model, modality, splits.train, splits.val, train_config, progress)
    device = resolve_device(config.device)
    calibrated = calibrate_model(model, modality, splits.val, sizes, config.seed,
                                 min(32, max(2, len(reference) // 8)), device)
    summary = {"trained_on": collection.kind, "adapted": {**source, "items": len(collection.views),
                                                          "kind": collection.kind},
               "loss": config.loss, "epochs": config.epochs, "seed": config.seed,
               "train_seconds": round(history.seconds, 1), "seconds": round(time.perf_counter() - started, 1),
               "train_views": len(splits.train), "final": history.epochs[-1] if history.epochs else {},
               "config": asdict(config)}
    return write_bundle(out_dir, calibrated, modality, version, {"trained": config.epochs > 0, "training": summary})


def next_version(models: Path, name: str = TEXT_BUNDLE) -> str:
    """One past the highest version under ``models/name`` (2 when only the base is there)."""
    versions = [int(p.name) for p in (models / name).glob("*") if p.name.isdigit()]
    return str(max([1, *versions]) + 1)


def read_jsonl(path: Path) -> list[tuple[str, bytes]]:
    """Items from a JSONL file in ``twinstream ingest``'s format: {"record": {...}} or {"text": "..."}."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "record" in row:
            items.append(("record", json.dumps(row["record"]).encode()))
        elif "text" in row:
            items.append(("text", str(row["text"]).encode()))
        else:
            raise AdaptError(f"{path}:{number}: a line needs a \"record\" or a \"text\" field")
    return items
