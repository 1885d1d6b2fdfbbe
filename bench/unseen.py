"""The ``unseen`` section: out-of-the-box quality on data nothing was trained or calibrated on.

One stream per set (``bench.unseen_data``), the same for every method, and no labels for anyone:
no method gets a validation stream, so each decides with what it ships with.

* twinstream: the bundle replayed in-process through the indexer's own decision path
  (``bench.quality.twinstream_rows``, as for FEBRL), with the thresholds it ships with;
* recordlinkage ECM (records): sorted-neighbourhood blocking (window 9) on every column,
  Jaro-Winkler on every column made binary at 0.85 (the FEBRL baseline's settings), the
  unsupervised ECM classifier;
* MinHash LSH (records and text): ``datasketch``, character 5-grams of the text (a record's
  values joined), duplicate when the estimated Jaccard reaches 0.5;
* RETSim (text and records): ``unisim``'s default near-duplicate threshold, cosine >= 0.9;
* pHash (images): Hamming distance <= 10 of 64 bits, the usual near-duplicate cut.

The baselines' rules are their documented or customary defaults, fixed before any run. µAP ranks
every item's best link by score and needs no threshold: it shows what a method could reach with
labels to pick a threshold.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench import quality, retsim
from bench.methods import MinHashConfig, Stream, dense_links, minhash_links
from bench.metrics import Link, at_threshold
from bench.quality import DatasetResult, Encoders, Row, row
from bench.records import PairScores, pair_links
from bench.unseen_data import UnseenSet, load
from twinstream.learn.adapt import AdaptConfig
from twinstream.v1 import items_pb2

log = logging.getLogger(__name__)

WINDOW = 9
BINARY_AT = 0.85
MINHASH_JACCARD = 0.5
RETSIM_THRESHOLD = 0.9  # unisim's TextSim default similarity_threshold
PHASH_HAMMING = 10
DEFAULT_SETS = ("companies", "restaurants", "books", "products", "readmes", "icons")


def record_frame(stream: Stream) -> pd.DataFrame:
    """The records as a frame of strings, one column per field any record has (NaN where missing)."""
    records = [json.loads(c) for c in stream.contents]
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in records], index=pd.Index(stream.ids, name="id"),
                        columns=columns)


def record_text(content: bytes) -> str:
    """A record's values in field order, for the text methods."""
    return " ".join(str(v) for v in json.loads(content).values())


def ecm_all_columns(data: pd.DataFrame) -> PairScores:
    """recordlinkage's unsupervised pipeline with default comparisons on all columns."""
    import recordlinkage as rl

    indexer = rl.Index()
    for column in data.columns:
        indexer.sortedneighbourhood(column, window=WINDOW)
    pairs = indexer.index(data)
    compare = rl.Compare(n_jobs=1)
    for column in data.columns:
        compare.string(column, column, method="jarowinkler", missing_value=0, label=column)
    binary = (compare.compute(pairs, data) >= BINARY_AT).astype(int)
    classifier = rl.ECMClassifier(binarize=None)
    matches = set(classifier.fit_predict(binary))
    probability = classifier.prob(binary)
    return PairScores(list(binary.index), probability.tolist(), [p in matches for p in binary.index])


def phash_links(stream: Stream) -> list[Link]:
    hashes = quality.perceptual_hashes(stream)["pHash"]
    return at_threshold(dense_links(hashes, stream.entities), 1 - 2 * PHASH_HAMMING / 64)


@dataclass(frozen=True)
class Bundles:
    """twinstream bundles to measure per modality, each with its label."""

    records: Sequence[tuple[str, Path]]
    text: Sequence[tuple[str, Path]]
    images: Sequence[tuple[str, Path]]

    def for_modality(self, modality: items_pb2.Modality.ValueType) -> Sequence[tuple[str, Path]]:
        return {items_pb2.RECORD: self.records, items_pb2.TEXT: self.text}.get(modality, self.images)


def set_texts(unseen: UnseenSet) -> list[str] | None:
    """What the text methods see: a record's values joined, a text as it is; None for images."""
    stream = unseen.stream
    if stream.modality == items_pb2.RECORD:
        return [record_text(c) for c in stream.contents]
    if stream.modality == items_pb2.TEXT:
        return [c.decode() for c in stream.contents]
    return None


def measure(unseen: UnseenSet, bundles: Bundles, encoders: Encoders,
            retsim_vectors: np.ndarray | str) -> DatasetResult:
    """Every applicable method on one set's stream (``retsim_vectors``: the set's RETSim
    embeddings, or why there are none)."""
    started = time.perf_counter()
    stream = unseen.stream
    result = DatasetResult(unseen.name, unseen.source, len(stream), unseen.entities, 0)
    if stream.modality == items_pb2.RECORD:
        try:
            result.rows.append(row("recordlinkage: SNI + ECM, all columns (unsupervised)", "baseline",
                                   "ECM match", pair_links(stream, ecm_all_columns(record_frame(stream)))))
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError) as exc:
            result.notes.append(f"recordlinkage ECM failed on this set: {exc}")
    texts = set_texts(unseen)
    if texts is not None:
        links = minhash_links(texts, stream.entities, MinHashConfig())
        result.rows.append(row("MinHash LSH (datasketch)", "baseline", f"Jaccard >= {MINHASH_JACCARD}",
                               at_threshold(links, MINHASH_JACCARD), MINHASH_JACCARD))
        if isinstance(retsim_vectors, str):
            result.notes.append(f"RETSim left out: {retsim_vectors}")
        else:
            result.rows.append(row("RETSim (unisim 1.0.1)", "baseline", f"cosine >= {RETSIM_THRESHOLD} (default)",
                                   at_threshold(dense_links(retsim_vectors, stream.entities), RETSIM_THRESHOLD),
                                   RETSIM_THRESHOLD))
    else:
        result.rows.append(row("pHash (imagehash, 64 bit)", "baseline", f"Hamming <= {PHASH_HAMMING}",
                               phash_links(stream), 1 - 2 * PHASH_HAMMING / 64))
    for label, bundle in bundles.for_modality(stream.modality):
        result.rows += quality.twinstream_rows(label, encoders.get(bundle), stream, None)
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def retsim_all(sets: Sequence[UnseenSet], retsim_python: Path | None) -> list[np.ndarray | str]:
    """RETSim embeddings of every set's texts, in one run of its interpreter (it loads slowly)."""
    texts = [set_texts(s) or [] for s in sets]
    if not any(texts):
        return ["no text"] * len(sets)
    try:
        vectors = retsim.embed([t for ts in texts for t in ts], retsim.interpreter(retsim_python))
    except retsim.RetsimUnavailable as exc:
        return [str(exc)] * len(sets)
    bounds = np.cumsum([0, *(len(t) for t in texts)])
    return [vectors[a:b] for a, b in itertools.pairwise(bounds)]


def adapted_row(unseen: UnseenSet, encoders: Encoders, out_dir: Path, config: AdaptConfig) -> list[Row]:
    """``twinstream adapt`` on the set's own items (no labels), then that bundle replayed on the
    same stream like any other: what a user gets after one adapt + reembed + promote."""
    from twinstream.learn.adapt import adapt

    kind = "record" if unseen.stream.modality == items_pb2.RECORD else "text"
    bundle = out_dir / unseen.name / "twinstream_text" / "2"
    started = time.perf_counter()
    manifest = adapt([(kind, c) for c in unseen.stream.contents], bundle, "2", config,
                     {"what": f"unseen set {unseen.name}"}, progress=False)
    seconds = time.perf_counter() - started
    rows = quality.twinstream_rows(f"twinstream adapted on the set's own items ({seconds:.0f} s, "
                                   f"{config.text_tuning}, {config.epochs} epochs)", encoders.get(bundle),
                                   unseen.stream, None)
    log.info("adapted %s in %.0f s: %s", unseen.name, seconds, manifest["thresholds"])
    return rows


def run(names: Sequence[str], limit: int, seed: int, bundles: Bundles, encoders: Encoders,
        retsim_python: Path | None, adapt_dir: Path | None = None,
        adapt_config: AdaptConfig | None = None) -> list[tuple[UnseenSet, DatasetResult]]:
    """Every set measured; with ``adapt_dir``, also adapted on each record and text set."""
    sets = []
    for name in names:
        log.info("unseen set %s", name)
        sets.append(load(name, limit, seed))
    embedded = retsim_all(sets, retsim_python)
    out = []
    for unseen, vectors in zip(sets, embedded, strict=True):
        result = measure(unseen, bundles, encoders, vectors)
        if adapt_dir is not None and unseen.stream.modality != items_pb2.IMAGE:
            started = time.perf_counter()
            result.rows += adapted_row(unseen, encoders, adapt_dir, adapt_config or AdaptConfig(seed=seed))
            result.seconds = round(result.seconds + time.perf_counter() - started, 1)
        out.append((unseen, result))
    return out
