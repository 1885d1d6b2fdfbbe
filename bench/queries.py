"""Match queries at scale: synthetic clustered vectors in a Milvus 2.3 server (the stack's),
written and searched through twinstream's ``VectorStore`` (the schema, HNSW M=16/efConstruction=200,
the scope filter, the ef and the consistency level the Matching service uses), recall@10 against
exact numpy search. ``bench/milvus.py`` sweeps ef, idle and under concurrent ingest.

One collection grows through the requested sizes: rows go in 10k at a time with a flush every
100k, and the collection is released while it is written and loaded once every sealed segment is
HNSW-indexed, so that what is timed is the index, not a scan of growing segments.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.metrics import percentiles
from bench.speed import hwm_kib
from twinstream.common.vectorstore import MATCH_CONSISTENCY, VectorStore, row_key, scope_filter
from twinstream.devstack import ManagedProcess, running_milvus
from twinstream.matching.service import RESULT_FIELDS as MATCH_FIELDS  # what a Match request reads
from twinstream.v1 import items_pb2

TENANT, COLLECTION = "bench", "synthetic"
INSERT_BATCH = 10_000
MIN_INDEXED_ROWS = 1024  # Milvus leaves smaller segments unindexed (indexCoord.segment.minSegmentNumRowsToEnableIndex)
SEGMENT_ROWS = 100_000
K = 10


@dataclass(frozen=True)
class QueryPoint:
    vectors: int
    dims: int
    insert_s: float
    index_build_s: float
    latency_queries: int
    qps: float
    p50_ms: float
    p99_ms: float
    batch_qps: float
    recall_at_10: float
    milvus_rss_mib: float


class Synthetic:
    """Clustered unit vectors: Gaussian blobs around random centres, re-normalised; queries are
    fresh draws from the same mixture."""

    def __init__(self, dims: int, clusters: int, seed: int, spread: float = 0.6) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((clusters, dims)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.dims, self.spread, self.seed = dims, spread, seed

    def draw(self, count: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, stream))
        picks = rng.integers(0, len(self.centres), count)
        noise = rng.standard_normal((count, self.dims)).astype(np.float32) * (self.spread / np.sqrt(self.dims))
        points = self.centres[picks] + noise
        return points / np.linalg.norm(points, axis=1, keepdims=True)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int, block: int = 200_000) -> np.ndarray:
    """Row indices of the exact top-k by cosine (vectors are unit length)."""
    best_score = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_index = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(base), block):
        sims = queries @ base[start:start + block].T
        take = min(k, sims.shape[1])
        part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        best_score = np.concatenate([best_score, np.take_along_axis(sims, part, axis=1)], axis=1)
        best_index = np.concatenate([best_index, part + start], axis=1)
        order = np.argsort(-best_score, axis=1)[:, :k]
        best_score = np.take_along_axis(best_score, order, axis=1)
        best_index = np.take_along_axis(best_index, order, axis=1)
    return best_index


def milvus_server(root: Path) -> contextlib.AbstractContextManager[tuple[str, ManagedProcess]]:
    """A Milvus server of its own (the stack's, started the same way)."""
    return running_milvus(root)


def _rss_mib(process: ManagedProcess) -> float:
    return round(hwm_kib(process.popen.pid) / 1024, 1) if process.popen is not None else 0.0


def _rows(vectors: np.ndarray, start: int) -> list[dict[str, object]]:
    # every field of the store's schema: Milvus 2.3 ignores nullable, so "signals" must be set
    return [{"pk": row_key(TENANT, COLLECTION, str(start + i)), "item_id": str(start + i), "tenant": TENANT,
             "collection": COLLECTION, "content_hash": "", "cluster_id": str(start + i), "ingest_ms": 0,
             "event_ms": 0, "metadata": {}, "decision": "", "deleted_ms": 0, "signals": {}, "vector": v}
            for i, v in enumerate(vectors)]


def _insert(store: VectorStore, name: str, data: np.ndarray, start: int, stop: int) -> None:
    """Rows [start, stop) in 10k batches (two in flight), a flush after every 100k."""
    with ThreadPoolExecutor(2) as pool:
        for segment in range(start, stop, SEGMENT_ROWS):
            end = min(stop, segment + SEGMENT_ROWS)
            batches = [(s, min(end, s + INSERT_BATCH)) for s in range(segment, end, INSERT_BATCH)]
            list(pool.map(lambda b: store.upsert(name, _rows(data[b[0]:b[1]], b[0])), batches))
            store.flush(name)


def indexable_rows(start: int, stop: int) -> int:
    """Rows that ``_insert(start, stop)`` puts in segments big enough for Milvus to index."""
    sizes = [min(stop, s + SEGMENT_ROWS) - s for s in range(start, stop, SEGMENT_ROWS)]
    return sum(n for n in sizes if n >= MIN_INDEXED_ROWS)


def wait_indexed(store: VectorStore, name: str, rows: int, timeout_s: float = 3600.0) -> None:
    """Until the HNSW index covers ``rows`` rows (searching earlier would time a brute-force scan)."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = store.client.describe_index(name, "vector")
        if int(info.get("indexed_rows", 0)) >= rows and not int(info.get("pending_index_rows", 0)):
            return
        time.sleep(1)
    raise TimeoutError(f"index not built after {timeout_s:.0f}s: {info}")


def run(sizes: Sequence[int], dims: int, root: Path, seed: int, latency_queries: int,
        recall_queries: int, max_latency_s: float) -> list[QueryPoint]:
    """Grow one collection through ``sizes`` and measure queries at each size."""
    sizes = sorted(sizes)
    generator = Synthetic(dims, clusters=max(16, sizes[-1] // 2000), seed=seed)
    data = generator.draw(sizes[-1], stream=0)
    queries = generator.draw(max(latency_queries, recall_queries), stream=1)
    expr = scope_filter(TENANT, COLLECTION)
    points = []
    with milvus_server(root) as (uri, process):
        store = VectorStore(uri)
        name = store.ensure_collection(items_pb2.ModelRef(name=f"bench_d{dims}", version="1"), dims,
                                       make_live=False)
        store.client.release_collection(name)
        written = indexable = 0
        for size in sizes:
            started = time.perf_counter()
            _insert(store, name, data, written, size)
            indexable += indexable_rows(written, size)
            insert_s = time.perf_counter() - started
            written = size
            started = time.perf_counter()
            wait_indexed(store, name, indexable)
            store.client.load_collection(name)
            build_s = time.perf_counter() - started
            store.search(name, queries[:2], K + 1, expr)  # warm-up
            latencies = []
            budget = time.perf_counter() + max_latency_s
            for vector in queries[:latency_queries]:
                began = time.perf_counter()
                # k+1, fields and consistency: as Match sends them
                store.search(name, [vector], K + 1, expr, MATCH_FIELDS, consistency=MATCH_CONSISTENCY)
                latencies.append(time.perf_counter() - began)
                if time.perf_counter() > budget and len(latencies) >= 20:
                    break
            began = time.perf_counter()
            found = []
            for start in range(0, recall_queries, 100):
                hits = store.search(name, queries[start:min(recall_queries, start + 100)], K, expr,
                                    consistency=MATCH_CONSISTENCY)
                found += [[int(h.fields["item_id"]) for h in row] for row in hits]
            batch_s = time.perf_counter() - began
            truth = exact_top_k(data[:size], queries[:recall_queries], K)
            recall = float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))
            p50, p99 = percentiles([s * 1000 for s in latencies])
            points.append(QueryPoint(size, dims, round(insert_s, 1), round(build_s, 1), len(latencies),
                                     len(latencies) / sum(latencies), p50, p99, recall_queries / batch_s, recall,
                                     _rss_mib(process)))
            store.client.release_collection(name)
        store.client.close()
    return points
